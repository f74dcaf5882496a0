"""Large contexts without copies: states kept live instead of pickled, batches of prompts and
contexts handed over as bytes, the embedded sandbox opened ahead of the first cell.

Real wasm throughout; the planes as real processes where HTTP is what is tested.
"""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from functions.contract import (
    EXECUTE_BYTES_TYPE,
    SUBCALL_BYTES_TYPE,
    ExecuteRequest,
    context_bytes,
    context_ref,
)
from functions.errors import MissingRefs
from functions.execute.cells import CellRunner, unpack_state
from functions.execute.settings import ExecuteSettings
from functions.infer.service import prompts_digest
from functions.testing.load import restarting, start_stack
from functions.testing.scripted_model import repl, scripted_replies
from tests.conftest import WASM_CACHE, free_port, infer_env, serve

SCOPE = "large-contexts-scope-0001"
BIG = "big = [f'{i:06d}' * 200 for i in range(3000)]"  # 3.6 MB, past the 1 MiB inline size


def session_cell(runner, sid: str, code: str, ref: str | None = None, **fields):
    fields.setdefault("scope", SCOPE)
    state = {"ref": ref} if ref else None
    return runner.run(ExecuteRequest(code=code, session_id=sid, state=state, **fields))


# ----------------------------------------------------------------------------- live states


def test_a_large_state_is_kept_live_and_never_pickled(runner):
    r1 = session_cell(runner, "live", BIG + "\nn = 1")
    assert r1.error is None and r1.state.live_only and r1.state.data is None
    assert not runner.blobs.get((SCOPE, r1.state.ref))  # nothing pickled, nothing kept
    r2 = session_cell(runner, "live", "n += 1\nprint(n, len(big))", r1.state.ref)
    assert r2.stdout == "2 3000\n" and r2.state.live_only and r2.state.ref != r1.state.ref
    # Small again: pickled, inline, addressed by its content, as any small state.
    r3 = session_cell(runner, "live", "del big", r2.state.ref)
    assert not r3.state.live_only and r3.state.data
    unpack_state(r3.state.data, 1 << 20, r3.state.ref)  # refused if it were not its sha256


def test_another_pod_asks_for_a_live_state_and_the_caller_replays(runner):
    r1 = session_cell(runner, "live-lost", BIG)
    runner.sessions.clear()  # the pod lost the interpreter: no blob stands behind the ref
    with pytest.raises(MissingRefs) as missing:
        session_cell(runner, "live-lost", "len(big)", r1.state.ref)
    assert missing.value.missing == ["state"]


def test_a_cell_stopped_after_a_live_state_goes_back_to_its_ref(runner):
    r1 = session_cell(runner, "live-trap", BIG)
    r2 = session_cell(runner, "live-trap", "while True: pass", r1.state.ref,
                      limits={"deadline_s": 0.5})  # fmt: skip
    assert r2.trapped == "deadline" and r2.session_reset and r2.state.ref == r1.state.ref
    with pytest.raises(MissingRefs):  # the interpreter is gone: the caller rebuilds by replay
        session_cell(runner, "live-trap", "len(big)", r1.state.ref)


def test_return_state_pickles_a_large_state_and_another_pod_restores_it(runner):
    r1 = session_cell(runner, "asked", BIG, return_state=True)
    assert not r1.state.live_only and r1.state.data and r1.state.size > 1 << 20
    runner.sessions.clear()
    runner.blobs.clear()
    r2 = runner.run(ExecuteRequest(code="print(len(big))", session_id="asked", scope=SCOPE,
                                   state={"ref": r1.state.ref, "data": r1.state.data}))  # fmt: skip
    assert r2.stdout == "3000\n"


def test_the_inline_size_setting_decides_what_is_pickled():
    runner = CellRunner(ExecuteSettings(wasm_cache_dir=WASM_CACHE, state_inline_bytes=4096))
    try:
        small = session_cell(runner, "setting", "s = 'x' * 1000")
        assert not small.state.live_only and small.state.data
        large = session_cell(runner, "setting", "s = 'x' * 10_000", small.state.ref)
        assert large.state.live_only and large.state.data is None
    finally:
        runner.close()


# ----------------------------------------------------------------------------- batches


BATCH = """
prompts = [chr(233) * 70_000, '', 'plain', '\\u2603' * 40_000, 'x' * 150_000]
replies = llm_query_batched(prompts)
print(replies == [str(len(p.encode())) for p in prompts])
"""


def byte_lengths(request) -> str:
    return str(len(request.last.encode()))


def test_a_large_batch_reaches_the_model_exactly(stack, llm):
    """A batch past one tool frame goes as bytes: multi-byte text, empty prompts, order kept."""
    llm.switch.current = scripted_replies([repl(BATCH), "FINAL(done)"], byte_lengths)
    r = httpx.post(stack.infer.url + "/infer", json={"query": "q", "context": "c",
                   "trajectory": True}, timeout=120)  # fmt: skip
    cells = [e for e in r.json()["trajectory"] if e["kind"] == "cell"]
    assert cells[0]["stdout"] == "True\n", cells[0]
    assert sorted(len(r.last) for r in llm.sub_requests()) == [0, 5, 40_000, 70_000, 150_000]


WRITE = "def write(data):\n    with open('/rlm/batch.out', 'wb') as f:\n        f.write(data)\n"


def guest_output(url: str, code: str, **fields) -> str:
    """What a cell printed: `code` runs in a try block that prints the exception it raises."""
    body = "from host import tools\n" + WRITE + "try:\n"
    body += "".join(f"    {line}\n" for line in code.splitlines())
    body += "except Exception as e:\n    print(type(e).__name__, e)\n"
    r = httpx.post(url + "/execute", json={"code": body, **fields}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["stdout"]


def test_a_large_batch_reaches_the_model_exactly_embedded(llm):
    from functions.sdk import RLM

    llm.switch.current = scripted_replies([repl(BATCH), "FINAL(done)"], byte_lengths)
    model = {"base_url": llm.base_url, "api_key": "k", "model_name": "scripted-root"}
    with RLM(model) as rlm:
        result = rlm.completion("c", root_prompt="q")
    cells = [e for e in result.metadata["trajectory"] if e["kind"] == "cell"]
    assert cells[0]["stdout"] == "True\n", cells[0]
    assert sorted(len(r.last) for r in llm.sub_requests()) == [0, 5, 40_000, 70_000, 150_000]


@pytest.mark.parametrize(
    ("code", "message"),
    [
        # A prompt with a lone surrogate is no text a model can read.
        ("llm_query_batched(['x' * 60_000, 'y' * 50_000 + '\\ud800'])", "prompt 1 is not text"),
        # A cell's own writes and calls, not the driver's: each refused before it is sent on.
        ("write(b'abc')\ntools.subcall(kind='llm', prompts=[], batch=[2])", "add up to 2"),
        ("tools.subcall(kind='llm', prompts=[], batch=[1])", "was not written"),
        (
            "write(b'a' * 7)\ntools.subcall(kind='llm', prompts=[], batch=[1] * 7)",
            "at most 5 per cell",
        ),
        ("write(b'ab')\ntools.subcall(kind='llm', prompts=[], batch=[-1, 3])", "lengths in bytes"),
        ("write(b'ab')\ntools.subcall(kind='llm', prompts=[], batch=[])", "holds no prompts"),
    ],
)
def test_bad_batches_are_refused_with_a_reason(execute_server, code, message):
    callback = {"url": "http://127.0.0.1:9/subcalls", "token": "t"}  # never reached
    stdout = guest_output(execute_server.url, code, callback=callback)
    assert message in stdout, stdout


def test_a_batch_that_is_no_utf8_is_refused_by_infer(stack, llm):
    code = "write(b'\\xff\\xfe')\ntools.subcall(kind='llm', prompts=[], batch=[2])"
    llm.switch.current = scripted_replies([repl(
        "from host import tools\n" + WRITE + "try:\n"
        + "".join(f"    {line}\n" for line in code.splitlines())
        + "except Exception as e:\n    print(type(e).__name__, e)"
    ), "FINAL(done)"])  # fmt: skip
    r = httpx.post(stack.infer.url + "/infer", json={"query": "q", "context": "c",
                   "trajectory": True}, timeout=120)  # fmt: skip
    stdout = next(e["stdout"] for e in r.json()["trajectory"] if e["kind"] == "cell")
    assert "sub-call refused (HTTP 400)" in stdout, stdout  # infer's reason stays with infer
    assert not llm.sub_requests()


def test_the_batch_cap_stops_the_guest_before_the_host_holds_it(tmp_path, llm):
    """EXECUTE_MAX_BATCH_MB: the driver refuses before writing, and the host refuses a file
    a cell writes past it on its own."""
    execute = serve("execute", {"EXECUTE_MAX_BATCH_MB": "1"}, tmp_path, ready="/health/readiness")
    port = free_port()
    infer = serve("infer", infer_env(llm, execute.url, port), tmp_path, port=port)
    code = (
        "try:\n    llm_query_batched(['x' * 600_000] * 2)\n"
        "except SubcallError as e:\n    print(e)\n"
        "try:\n    with open('/rlm/batch.out', 'wb') as f:\n        f.write(b'x' * (2 << 20))\n"
        "except OSError as e:\n    print('refused', e.errno)\n"
    )
    llm.switch.current = scripted_replies([repl(code), "FINAL(done)"])
    try:
        r = httpx.post(infer.url + "/infer", json={"query": "q", "context": "c",
                       "trajectory": True}, timeout=120)  # fmt: skip
        stdout = next(e["stdout"] for e in r.json()["trajectory"] if e["kind"] == "cell")
        assert "over 1,048,576 bytes (EXECUTE_MAX_BATCH_MB)" in stdout, stdout
        assert "refused 22" in stdout, stdout  # EFBIG
    finally:
        infer.stop()
        execute.stop()


def test_prompt_bytes_are_part_of_the_memo_key():
    assert prompts_digest(["ab", "c"]) != prompts_digest(["a", "bc"])
    assert prompts_digest(["a\ud800"]) != prompts_digest(["a"])  # no error on a surrogate
    assert prompts_digest(["x"]) == prompts_digest(["x"])


# ----------------------------------------------------------------------------- the wire


def post_bytes(url: str, media: str, header: dict, *parts: bytes, **headers) -> httpx.Response:
    body = json.dumps(header).encode() + b"\n" + b"".join(parts)
    return httpx.post(url, content=body, timeout=60, headers={"content-type": media, **headers})


def test_a_context_sent_as_bytes_is_bound_unparsed(execute_server):
    text, data = "caf\u00e9 " * 50_000, {"docs": ["a", "b"]}
    header = {"code": "print(len(context), context_0['docs'])", "session_id": "bytes",
              "rlm_context": {"ref": context_ref(text), "data_bytes": len(text.encode()),
                              "data_kind": "text"},
              "rlm_contexts": [{"ref": context_ref(data), "data_bytes": len(context_bytes(data)),
                                "data_kind": "json"}]}  # fmt: skip
    r = post_bytes(execute_server.url + "/execute", EXECUTE_BYTES_TYPE, header, text.encode(),
                   context_bytes(data))  # fmt: skip
    assert r.status_code == 200 and r.json()["stdout"] == "250000 ['a', 'b']\n", r.text


@pytest.mark.parametrize(
    ("context", "tail", "status", "message"),
    [
        ({"ref": "a" * 64, "data_bytes": 5, "data_kind": "text"}, b"abc", 400, "add up to 5"),
        ({"ref": "a" * 64, "data_bytes": 3}, b"abc", 400, "data_kind"),
        (
            {"ref": "a" * 64, "data": "abc", "data_bytes": 3, "data_kind": "text"},
            b"abc",
            400,
            "not data",
        ),
        ({"ref": "a" * 64, "data_bytes": 3, "data_kind": "text"}, b"abc", 422, "does not match"),
        ({"ref": "a" * 64, "data_bytes": -1, "data_kind": "text"}, b"", 422, "data_bytes"),
    ],
)
def test_bad_context_bytes_are_4xx(execute_server, context, tail, status, message):
    r = post_bytes(execute_server.url + "/execute", EXECUTE_BYTES_TYPE,
                   {"code": "1", "rlm_context": context}, tail)  # fmt: skip
    assert r.status_code == status and message in r.json()["error"], r.text


def test_a_bytes_body_without_its_header_is_400(execute_server, stack):
    for url, media in ((execute_server.url + "/execute", EXECUTE_BYTES_TYPE),
                       (stack.infer.url + "/subcalls", SUBCALL_BYTES_TYPE)):  # fmt: skip
        r = httpx.post(url, content=b"no header here", headers={"content-type": media,
                       "authorization": "Bearer t"}, timeout=30)  # fmt: skip
        assert r.status_code == 400 and "a JSON object, a newline" in r.json()["error"], r.text


@pytest.mark.parametrize(
    ("header", "tail", "message"),
    [
        ({"kind": "llm", "prompt_bytes": [2, 2]}, b"abc", "add up to 4"),
        ({"kind": "llm", "prompts": ["a"], "prompt_bytes": [1]}, b"a", "not prompts"),
        ({"kind": "llm", "prompt_bytes": [2]}, b"\xc3(", "not UTF-8 text"),
        ({"kind": "llm", "prompt_bytes": [1], "extra": 1}, b"a", "unknown field"),
    ],
)
def test_bad_batch_bodies_are_4xx_before_any_token_is_spent(stack, header, tail, message):
    r = post_bytes(stack.infer.url + "/subcalls", SUBCALL_BYTES_TYPE, header, tail,
                   authorization="Bearer not-a-token")  # fmt: skip
    assert r.status_code in (400, 422) and message in r.json()["error"], r.text


def test_data_bytes_in_a_json_body_is_400(execute_server):
    context = {"ref": "a" * 64, "data_bytes": 3, "data_kind": "text"}
    r = httpx.post(execute_server.url + "/execute", json={"code": "1", "rlm_context": context},
                   timeout=30)  # fmt: skip
    assert r.status_code == 400 and "data_bytes comes only with" in r.json()["error"], r.text


def test_prompt_bytes_in_a_json_body_is_400(stack):
    r = httpx.post(stack.infer.url + "/subcalls", json={"kind": "llm", "prompt_bytes": [1]},
                   headers={"authorization": "Bearer t"}, timeout=30)  # fmt: skip
    assert r.status_code == 400 and "prompt_bytes comes only with" in r.json()["error"]


# ----------------------------------------------------------------------------- replay


def test_a_large_state_lost_with_its_pod_is_replayed_without_asking_the_model_again(tmp_path):
    """Each root turn lands on a fresh execute process: the live-only state of the first cell
    is rebuilt by replay, its batch answered from the memo."""

    def policy(request):
        if not request.is_root:
            return "sub-" + hashlib.sha256(request.last.encode()).hexdigest()[:8]
        steps = [
            repl(BIG + "\nr = llm_query_batched(['p' * 60_000, 'q' * 60_000])"),
            repl("answer['content'] = str(len(big)) + ' ' + r[1]\nanswer['ready'] = True"),
        ]
        return steps[min(request.turn, 1)]

    switch = {}
    stack = start_stack(lambda request: switch["policy"](request), tmp_path)
    try:
        switch["policy"], starts = restarting(stack, policy)
        r = httpx.post(stack.infer.url + "/infer", json={"query": "q", "context": "c"}, timeout=120)
        want = "sub-" + hashlib.sha256(b"q" * 60_000).hexdigest()[:8]
        assert r.json()["answer"] == f"3000 {want}", r.text
        assert len(starts) == 2 and len(stack.model.sub_requests()) == 2
    finally:
        stack.stop()
        for old in stack.replaced:
            old.stop()


# ----------------------------------------------------------------------------- start


class CountingRunner(CellRunner):
    """The embedded runner, counting the interpreters it opens."""

    opened = 0

    def _open(self):
        self.opened += 1
        return super()._open()


def test_the_embedded_sandbox_opens_once_ahead_of_the_first_cell():
    runner = CountingRunner(ExecuteSettings(wasm_cache_dir=WASM_CACHE), keep_spare=False)
    try:
        runner.prewarm(wait=False)
        assert session_cell(runner, "first", "print(1)").stdout == "1\n"
        assert runner.opened == 1  # the cell waited for the one being opened
        assert session_cell(runner, "second", "print(2)").stdout == "2\n"
        assert runner.opened == 2  # and no spare was opened beside them
    finally:
        runner.close()

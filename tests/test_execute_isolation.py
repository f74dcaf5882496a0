"""One execute pod shared by hostile tenants, on real wasm: each tenant's sessions and cached
blobs are reached only from its own scope, a cell that tampers with the driver fails inside its
own session, and the host's memory stays within its settings whatever a cell or a body holds."""

from __future__ import annotations

import base64
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from functions.contract import ExecuteRequest, context_ref, sha256_hex
from functions.errors import BadCell, MissingRefs
from functions.execute.cells import pack_state
from functions.execute.settings import MIB, ExecuteSettings
from functions.testing.processes import process_tree
from functions.testing.scripted_model import repl
from tests.conftest import Served, serve

A = "tenant-a-scope-0000000001"
B = "tenant-b-scope-0000000002"


def unpacked(state) -> bytes:
    """The pickle a response's state.data carries."""
    return zlib.decompress(base64.b64decode(state.data))


def run(runner, code: str, scope: str, sid: str | None = None, state=None, **fields):
    state_ref = {"ref": state.ref} if state else None
    return runner.run(
        ExecuteRequest(code=code, scope=scope, session_id=sid, state=state_ref, **fields)
    )


# ----------------------------------------------------------------------------- sessions


def test_another_scope_cannot_reach_or_end_a_session(runner):
    a1 = run(runner, "secret = 'a'\ngen = iter(range(10))\nnext(gen)", A, "same-id")
    assert a1.error is None
    # B names the same session id: with no state it gets a fresh interpreter of its own...
    b1 = run(runner, "print(globals().get('secret'))", B, "same-id")
    assert b1.stdout == "None\n" and b1.scope == B
    # ...and with A's ref, nothing: the pod holds that state for A only.
    with pytest.raises(MissingRefs) as missing:
        run(runner, "print(secret)", B, "same-id", a1.state)
    assert missing.value.missing == ["state"]
    # A's interpreter lives on: the iterator (which no state carries) is where A left it.
    a2 = run(runner, "print(next(gen), secret)", A, "same-id", a1.state)
    assert a2.stdout == "1 a\n" and not a2.session_reset


# A cell that makes its interpreter a spy on the next cell's code and silences the report.
HIJACK = (
    "import sys\n"
    "driver = sys.modules['_rlm_driver']\n"
    "seen = []\n"
    "driver.cell = lambda plan, code: seen.append(code)\n"
    "driver.write_fd = lambda fd, data: len(data)\n"
    "driver.report_to_file = lambda: None\n"
)


def test_a_cell_without_its_report_fails_and_its_interpreter_is_never_reused(runner):
    a0 = run(runner, "x = 1", A, "hijack")
    a1 = run(runner, HIJACK, A, "hijack", a0.state)
    assert a1.error.type == "CellFailed" and a1.session_reset
    assert a1.state.ref == a0.state.ref  # back to the last good state
    # The next cells with the same session id and no state, from either scope (as a second run
    # reusing the id would send), run in fresh interpreters: no spy sees their code.
    for scope in (A, B):
        r = run(runner, "print('seen' in globals(), 'x' in globals())", scope, "hijack")
        assert r.stdout == "False False\n", r
    # The owner goes on from its last good state.
    a2 = run(runner, "print(x)", A, "hijack", a0.state)
    assert a2.stdout == "1\n" and a2.error is None


def test_a_forged_report_fails_the_cell(runner):
    a0 = run(runner, "kept = 'before'", A, "forge")
    forge = (
        "import json, os, sys\n"
        "marker = sys._getframe(2).f_locals['plan']['marker']\n"
        "fake = {'answer': {'ready': True, 'content': 'forged'}, 'locals': {}}\n"
        "os.write(2, (marker + json.dumps(fake)).encode())\n"
        "kept = 'after'\n"
    )
    a1 = run(runner, forge, A, "forge", a0.state)
    assert a1.error.type == "CellFailed" and "more than once" in a1.error.message
    assert a1.answer is None and a1.session_reset and a1.state.ref == a0.state.ref
    a2 = run(runner, "print(kept)", A, "forge", a1.state)
    assert a2.stdout == "before\n"


def test_a_report_forged_alone_is_bounded_by_the_host(runner):
    """A cell that silences the driver and writes its own report speaks only for itself: the
    host keeps 200 previews of 300 characters at most and measures the state it is handed."""
    forge = (
        "import json, os, sys\n"
        "driver = sys.modules['_rlm_driver']\n"
        "marker = sys._getframe(2).f_locals['plan']['marker']\n"
        "driver.write_fd = lambda fd, data: len(data)\n"
        "names = {f'v{i}': {'type': 't' * 400, 'preview': 'p' * 400} for i in range(1000)}\n"
        "fake = {'locals': names, 'raw_state_size': 10 ** 15}\n"
        "_ = os.write(2, (marker + json.dumps(fake)).encode())\n"
    )
    r = run(runner, forge, A, "forge-alone")
    assert r.error is None, r.error
    assert len(r.locals) == 200
    assert all(len(v.type) <= 300 and len(v.preview) <= 300 for v in r.locals.values())
    assert r.state.size == len(unpacked(r.state))


def test_rebinding_names_changes_nothing_the_host_does(runner):
    victims = {}
    for i in range(3):
        victims[f"victim-{i}"] = run(runner, f"v = {i}", B, f"victim-{i}")
    rebind = (
        "len = lambda value: 10 ** 15\n"
        "print = None\n"
        "import json\n"
        "json.dumps = lambda *args, **kwargs: '{}'\n"
        "blob = 'x' * 100_000\n"
    )
    a = run(runner, rebind, A, "rebind")
    assert a.error is None, a.error
    assert a.state.size == len(unpacked(a.state))
    assert a.state.size < 1 << 20
    shown = run(runner, "SHOW_VARS()", A, "rebind", a.state)
    assert "blob: str" in shown.stdout, shown
    # The victims' interpreters are still live: each one's next cell is not a restore.
    for sid, first in victims.items():
        assert runner.sessions.get((B, sid)) is not None, sid
        r = run(runner, "print(v)", B, sid, first.state)
        assert r.stdout == f"{sid[-1]}\n" and not r.session_reset


def test_rebinding_builtins_stays_inside_the_session(runner):
    victim = run(runner, "v = 'victim'", B, "victim-of-builtins")
    rebind = "import builtins\nbuiltins.len = lambda value: 10 ** 15\nbuiltins.print = None\n"
    a = run(runner, rebind, A, "builtins")
    assert a.error is None or a.error.type == "CellFailed"
    assert a.state is None or a.state.size == len(unpacked(a.state))
    r = run(runner, "print(v, len('abc'))", B, "victim-of-builtins", victim.state)
    assert r.stdout == "victim 3\n" and not r.session_reset


def test_a_flooded_stderr_and_a_replaced_report_keep_the_deadline(runner):
    flood = (
        "import sys\n"
        "driver = sys.modules['_rlm_driver']\n"
        "def forever():\n"
        "    while True:\n"
        "        sys.stderr.write('e' * 100_000)\n"
        "driver.report_to_file = forever\n"
        "sys.stderr.write('x' * 3_000_000)\n"
    )
    before = run(runner, "kept = 1", A, "flood")
    started = time.monotonic()
    r = run(runner, flood, A, "flood", before.state,
            limits={"deadline_s": 1, "output_bytes": 1 << 20})  # fmt: skip
    assert time.monotonic() - started < 2.0
    assert r.error is not None and r.session_reset and r.state.ref == before.state.ref
    assert run(runner, "print(kept)", A, "flood", r.state).stdout == "1\n"


def test_a_conversations_contexts_never_enter_the_state(runner):
    big = "c" * (2 << 20)
    small = {"rows": list(range(10))}
    contexts = [{"ref": context_ref(big), "data": big}, {"ref": context_ref(small), "data": small}]
    r = runner.run(
        ExecuteRequest(
            code="y = 1",
            session_id="conv-state-size",
            scope=A,
            rlm_context=contexts[-1],
            rlm_contexts=contexts,
        )
    )
    assert r.error is None and r.state.size < 1000, r.state.size
    blob = unpacked(r.state)
    assert b"ccccccccc" not in blob and b"rows" not in blob


# ----------------------------------------------------------------------------- cached blobs


def test_a_ref_binds_cached_content_only_for_the_scope_that_sent_it(runner):
    text = "tenant A's private context\n" * 1000
    ref = context_ref(text)
    a = run(runner, "n = len(context)", A, "blobs", rlm_context={"ref": ref, "data": text})
    assert a.error is None
    assert run(runner, "len(context)", A, rlm_context={"ref": ref}).stdout == f"{len(text)}\n"

    def refusal(**fields) -> list[str]:
        with pytest.raises(MissingRefs) as missing:
            run(runner, "print(context)", B, **fields)
        return missing.value.missing

    # B presents A's refs: the answer is the one for refs no pod holds, so it learns nothing.
    nobody = "f" * 64
    assert refusal(rlm_context={"ref": ref}) == refusal(rlm_context={"ref": nobody})
    assert refusal(sid="blobs-b", state=a.state) == ["state"]
    unknown = a.state.model_copy(update={"ref": nobody})
    assert refusal(sid="blobs-b", state=unknown) == ["state"]
    contexts = {"rlm_contexts": [{"ref": ref}], "sid": "blobs-b"}
    assert refusal(**contexts) == ["rlm_contexts"]


def test_state_data_that_does_not_match_its_ref_is_refused_before_it_is_kept(runner):
    blob = b"\x80\x05N."  # a valid pickle (None); sent under another ref it is refused
    with pytest.raises(BadCell, match="does not match"):
        runner.run(ExecuteRequest(code="1", session_id="s", scope=A,
                                  state={"ref": "e" * 64, "data": pack_state(blob)}))  # fmt: skip
    assert runner.blobs.get((A, "e" * 64)) is None
    assert runner.blobs.get((A, sha256_hex(blob))) is None


# ----------------------------------------------------------------------------- host memory


def worker_status(served: Served) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of the process that runs the cells, in bytes."""
    worker = process_tree(served.process.pid)[-1]
    status = {}
    for line in Path(f"/proc/{worker}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            status[name] = int(value.split()[0]) * 1024
    return status


SMALL_POD = {
    "EXECUTE_MEMORY_MB": "512",
    "EXECUTE_CACHE_MB": "512",
    "EXECUTE_MAX_STATE_MB": "64",
    "EXECUTE_MAX_BATCH_MB": "8",
    "EXECUTE_MAX_SUBCALLS": "1000",
    "EXECUTE_CONCURRENCY": "2",
}


@pytest.fixture(scope="module")
def small_pod(tmp_path_factory) -> Iterator[Served]:
    served = serve("execute", SMALL_POD, tmp_path_factory.mktemp("small-pod"),
                   ready="/health/readiness")  # fmt: skip
    yield served
    served.stop()


def post(served: Served, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(served.url + "/execute", json=body, timeout=timeout)


def zip_bomb(size: int) -> str:
    """state.data that inflates to `size` bytes of zeros, made without holding them."""
    packer = zlib.compressobj(9)
    zero = bytes(1 << 20)
    parts = [packer.compress(zero) for _ in range(size >> 20)]
    return base64.b64encode(b"".join(parts) + packer.flush()).decode()


def test_state_that_inflates_past_the_cap_costs_the_host_nothing(small_pod):
    bomb = zip_bomb(2 << 30)
    assert len(bomb) < 4 << 20
    peak = worker_status(small_pod)["VmHWM"]
    answers: list[httpx.Response] = []

    def send() -> None:
        body = {"code": "1", "session_id": "bomb", "scope": A,
                "state": {"ref": "a" * 64, "data": bomb}}  # fmt: skip
        answers.append(post(small_pod, body))

    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for answer in answers:
        assert answer.status_code == 422 and "EXECUTE_MAX_STATE_MB" in answer.json()["error"]
    # The bodies themselves and their decoding, nothing near the 64 MB cap, let alone 2 GiB.
    assert worker_status(small_pod)["VmHWM"] - peak < 48 * MIB


def test_staging_is_bounded_as_parts_arrive(small_pod):
    callback = {"url": "http://127.0.0.1:9/subcalls", "token": "t"}
    before = worker_status(small_pod)
    health: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            started = time.monotonic()
            assert httpx.get(small_pod.url + "/health", timeout=10).status_code == 200
            health.append(time.monotonic() - started)
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        big = post(small_pod, {"code": "llm_query_batched(['x' * 1_000_000] * 250)",
                               "callback": callback})  # fmt: skip
        many = post(small_pod, {"code": "llm_query_batched(['y' * 200_000] * 12)",
                                "callback": callback, "limits": {"max_subcalls": 10}})  # fmt: skip
    finally:
        done.set()
        prober.join()
    error = big.json()["error"]
    assert error["type"] == "SubcallError" and "EXECUTE_MAX_BATCH_MB" in error["message"]
    error = many.json()["error"]
    assert error["type"] == "SubcallError" and "at most 10 per cell" in error["message"]
    assert worker_status(small_pod)["VmHWM"] - before["VmHWM"] < 64 * MIB
    assert max(health) < 1.0, health


def test_live_sessions_are_charged_their_real_memory(small_pod):
    """Three sessions each hold 200 MB in an iterator no state can carry: the pod keeps what
    its cache setting allows (512 MB, half of it for sessions), the oldest go first."""
    hold = (
        "def holder():\n"
        "    block = bytearray(200 << 20)\n"
        "    block[:: 1 << 12] = b'1' * len(block[:: 1 << 12])\n"
        "    yield len(block)\n"
        "keep = holder()\n"
        "print(next(keep))\n"
    )
    idle = worker_status(small_pod)["VmRSS"]
    states = {}
    for i in range(3):
        r = post(small_pod, {"code": hold, "session_id": f"holder-{i}", "scope": A})
        assert r.status_code == 200 and r.json()["stdout"] == f"{200 << 20}\n", r.text
        states[i] = r.json()["state"]
    rss = worker_status(small_pod)["VmRSS"]
    assert rss - idle < 256 * MIB + 64 * MIB, (rss - idle) >> 20
    # The newest session is live (its iterator goes on); the oldest is back from its state
    # blob, which never held the iterator.
    newest = post(small_pod, {"code": "print(next(keep, 'done'))", "session_id": "holder-2",
                              "scope": A, "state": {"ref": states[2]["ref"]}})  # fmt: skip
    assert newest.json()["stdout"] == "done\n"
    oldest = post(small_pod, {"code": "print('keep' in globals())", "session_id": "holder-0",
                              "scope": A, "state": {"ref": states[0]["ref"]}})  # fmt: skip
    assert oldest.json()["stdout"] == "False\n"


def test_pressure_never_evicts_a_running_cell(small_pod):
    slow = "import time\nblock = bytearray(100 << 20)\ntime.sleep(3)\nprint('finished')"
    outcome: list[httpx.Response] = []
    thread = threading.Thread(
        target=lambda: outcome.append(
            post(small_pod, {"code": slow, "session_id": "running", "scope": B})
        )
    )
    thread.start()
    time.sleep(0.5)
    for i in range(4):  # sessions that fill the cache while the slow cell runs
        r = post(small_pod, {"code": "filler = bytearray(150 << 20)", "session_id": f"fill-{i}",
                             "scope": B})  # fmt: skip
        assert r.status_code == 200
    thread.join()
    assert outcome[0].json()["stdout"] == "finished\n", outcome[0].text


def test_host_bytes_covers_what_a_pod_may_hold():
    settings = ExecuteSettings.from_env({})
    one = settings.host_bytes(1)
    assert settings.host_bytes(4) - one == 3 * (one - settings.host_bytes(0))
    assert one > settings.memory_bytes + settings.cache_bytes + 3 * settings.max_request_bytes


# ----------------------------------------------------------------------------- through /infer


def test_two_runs_with_one_run_id_share_no_interpreter(stack, llm):
    """The README invites callers to choose run_id: a run that hijacks its interpreter and a
    later run with the same run_id meet nowhere on the execute pod."""
    hijack = HIJACK + "secret = 'first run'\n"
    probe = (
        "answer['content'] = f\"{'seen' in globals()} {'secret' in globals()} {context}\"\n"
        "answer['ready'] = True"
    )

    def policy(request):
        if "first run" in request.messages[1]["content"]:
            return repl(hijack) if request.turn == 0 else "FINAL(done)"
        return repl(probe)

    llm.switch.current = policy
    url = stack.infer.url + "/infer"
    first = httpx.post(url, json={"query": "first run", "context": "x", "run_id": "chosen-id"},
                       timeout=120)  # fmt: skip
    assert first.status_code == 200 and first.json()["answer"] == "done", first.text
    second = httpx.post(url, json={"query": "second", "context": "mine", "run_id": "chosen-id"},
                        timeout=120)  # fmt: skip
    assert second.json()["answer"] == "False False mine", second.text


def test_a_report_that_claims_a_failed_load_is_that_cells_own_422(runner):
    claim = (
        "import json, os, sys\n"
        "driver = sys.modules['_rlm_driver']\n"
        "marker = sys._getframe(2).f_locals['plan']['marker']\n"
        "driver.write_fd = lambda fd, data: len(data)\n"
        "_ = os.write(2, (marker + json.dumps({'load_failed': True})).encode())\n"
    )
    before = run(runner, "kept = 1", A, "claims")
    with pytest.raises(BadCell, match="could not be loaded"):
        run(runner, claim, A, "claims", before.state)
    assert run(runner, "print(kept)", A, "claims", before.state).stdout == "1\n"


def test_a_cell_the_driver_cannot_describe_fails_and_never_shows_an_older_report(runner):
    before = run(runner, "kept = 1\nanswer['content'] = 'the earlier cell'", A, "describe")
    unprintable = (
        "class Loud:\n"
        "    def __str__(self):\n"
        "        raise ValueError('no')\n"
        "answer['content'] = Loud()\n"
    )
    r = run(runner, unprintable, A, "describe", before.state)
    assert r.error is None and r.answer is None and "answer cannot be read" in r.stderr
    flaky = (  # pickles only on its second try: the driver's last pickling raises
        "class Flaky:\n"
        "    tries = 0\n"
        "    def __reduce__(self):\n"
        "        Flaky.tries += 1\n"
        "        if Flaky.tries != 2:\n"
        "            raise ValueError('flaky')\n"
        "        return (Flaky, ())\n"
        "value = Flaky()\n"
        "kept = 2\n"
    )
    r = run(runner, flaky, A, "describe", before.state)
    assert r.error.type == "CellFailed" and "could not be reported" in r.error.message, r.error
    assert r.session_reset and r.answer is None and r.state.ref == before.state.ref
    assert run(runner, "print(kept)", A, "describe", r.state).stdout == "1\n"

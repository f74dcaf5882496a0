"""The execute plane's cell runner on real wasm: state, the guest API, limits, escapes."""

from __future__ import annotations

import base64
import contextlib
import os
import pickle
import socket
import threading
import zlib

import pytest

from functions.contract import ExecuteRequest, context_ref, sha256_hex
from functions.errors import BadCell, MissingRefs
from functions.execute.cells import pack_state

SCOPE = "sandbox-tests-scope-0001"  # the caller's owner of its sessions and blobs


def cell(runner, code: str, **fields):
    return runner.run(ExecuteRequest(code=code, **fields))


def session_cell(runner, sid: str, code: str, state=None, **fields):
    state_ref = {"ref": state.ref} if state else None
    fields.setdefault("scope", SCOPE)
    return runner.run(ExecuteRequest(code=code, session_id=sid, state=state_ref, **fields))


def test_seed_request_shape(runner):
    r = cell(runner, 'print("Hello from WASM!")\nx = 42 + 10\nprint(f"Result: {x}")', timeout=30)
    assert r.stdout == "Hello from WASM!\nResult: 52\n"
    assert r.stderr == ""
    assert r.locals["x"].type == "int" and r.locals["x"].preview == "52"
    assert r.execution_time > 0


def test_seed_variables_and_last_expression_echo(runner):
    r = cell(runner, "total = a + sum(b)\ntotal * 2", context={"a": 1, "b": [2, 3]})
    assert r.stdout == "12\n"
    assert r.locals["total"].preview == "6"


def test_user_exception_is_a_normal_result(runner):
    r = cell(runner, "def f():\n    raise ValueError('boom')\nf()")
    assert r.error.type == "ValueError" and r.error.message == "boom"
    assert 'File "<cell>", line 3' in r.error.traceback
    assert "<rlm>" not in r.error.traceback
    syntax = cell(runner, "def (:")
    assert syntax.error.type == "SyntaxError"


def test_state_survives_across_cells_and_pods(runner):
    sid = "state-survives"
    r1 = session_cell(
        runner, sid, "import re\ndef double(v): return v * 2\nclass Box:\n    n = 7\nb = Box()"
    )
    assert r1.error is None and r1.state.data
    r2 = session_cell(runner, sid, "print(double(21), b.n, re.sub('a', 'b', 'aa'))", r1.state)
    assert r2.stdout == "42 7 bb\n"
    # The pod loses the live session: the state blob restores functions, classes and instances.
    runner.sessions.clear()
    r3 = session_cell(runner, sid, "print(double(b.n))", r2.state)
    assert r3.stdout == "14\n"
    # Another pod that never saw the blob asks for it (409), then takes it inline.
    runner.sessions.clear()
    runner.blobs.clear()
    with pytest.raises(MissingRefs) as missing:
        session_cell(runner, sid, "print(b.n)", r3.state)
    assert missing.value.missing == ["state"]
    r4 = runner.run(
        ExecuteRequest(
            code="print(b.n)",
            session_id=sid,
            state={"ref": r3.state.ref, "data": r3.state.data},
            scope=SCOPE,
        )
    )
    assert r4.stdout == "7\n"


def test_unchanged_state_keeps_its_ref(runner):
    r1 = session_cell(runner, "same-ref", "x = 1")
    r2 = session_cell(runner, "same-ref", "print(x)", r1.state)
    assert r2.state.ref == r1.state.ref


def test_unpicklable_value_dropped_with_a_line(runner):
    r = session_cell(runner, "unpicklable", "import threading\nlock = threading.Lock()\nn = 3")
    assert "'lock'" in r.stderr and "cannot be pickled" in r.stderr
    runner.sessions.clear()
    r2 = session_cell(runner, "unpicklable", "print(n, 'lock' in globals())", r.state)
    assert r2.stdout == "3 False\n"


def test_context_by_reference(runner):
    text = "line with needle 123\n" * 1000
    ref = context_ref(text)
    with pytest.raises(MissingRefs) as missing:
        session_cell(runner, "ctx", "len(context)", rlm_context={"ref": ref})
    assert missing.value.missing == ["rlm_context"]
    r1 = session_cell(runner, "ctx", "len(context)", rlm_context={"ref": ref, "data": text})
    assert r1.stdout == f"{len(text)}\n"
    assert "context" not in r1.locals
    # A second session of the same scope on the same pod gets the context by reference alone.
    r2 = session_cell(runner, "ctx-2", "context.count('needle')", rlm_context={"ref": ref})
    assert r2.stdout == "1000\n"
    r2 = cell(runner, "context.count('needle')", rlm_context={"ref": ref}, scope=SCOPE)
    assert r2.stdout == "1000\n"
    data = {"docs": ["a", "b"], "n": 2}
    r3 = cell(runner, "print(type(context).__name__, context['n'])",
              rlm_context={"ref": context_ref(data), "data": data})  # fmt: skip
    assert r3.stdout == "dict 2\n"


def test_context_data_must_match_ref(runner):
    with pytest.raises(BadCell, match="does not match"):
        cell(runner, "1", rlm_context={"ref": "0" * 64, "data": "text"})


def test_answer_protocols(runner):
    r = cell(runner, "answer['content'] = 'forty-two'\nanswer['ready'] = True")
    assert r.answer.ready and r.answer.content == "forty-two"
    r = cell(runner, "result = [1, 2]\nFINAL_VAR('result')")
    assert r.answer.ready and r.answer.content == "[1, 2]"
    r = cell(runner, "FINAL_VAR('nope')")
    assert r.error.type == "NameError" and not r.answer.ready


def test_show_vars(runner):
    r = cell(runner, "chunks = ['a', 'b']\nSHOW_VARS()")
    assert "chunks: list" in r.stdout
    assert "llm_query" not in r.stdout


def test_subcall_without_callback_raises_in_guest(runner):
    r = cell(runner, "try:\n    llm_query('hi')\nexcept SubcallError as e:\n    print('caught', e)")
    assert r.stdout.startswith("caught sub-calls are not available")


def test_subcall_cap_is_enforced_by_the_host(runner):
    callback = {"url": "http://127.0.0.1:9/subcalls", "token": "t"}
    r = cell(
        runner,
        "llm_query_batched(['q'] * 4)",
        callback=callback,
        limits={"max_subcalls": 3},
    )
    assert r.error.type == "SubcallError" and "at most 3 per cell" in r.error.message


# ----------------------------------------------------------------------------- limits


def test_deadline_trips_and_session_resets(runner):
    r1 = session_cell(runner, "deadline", "kept = 'before'")
    r2 = session_cell(runner, "deadline", "while True: pass", r1.state, limits={"deadline_s": 0.5})
    assert r2.trapped == "deadline" and r2.session_reset
    assert r2.state.ref == r1.state.ref
    r3 = session_cell(runner, "deadline", "print(kept)", r2.state)
    assert r3.stdout == "before\n"


def test_fuel_trips(runner):
    r = cell(runner, "while True: pass", limits={"fuel": 50_000_000})
    assert r.trapped == "fuel" and "fuel" in r.error.message


def test_memory_cap_is_a_memory_error_and_session_lives(runner):
    r1 = session_cell(runner, "memory", "x = bytearray(4 * 1024**3)")
    assert r1.error.type in ("MemoryError", "OverflowError")
    assert not r1.trapped
    r2 = session_cell(runner, "memory", "print('alive')", r1.state)
    assert r2.stdout == "alive\n"


def test_output_is_truncated_with_a_marker(runner):
    r = cell(runner, "print('x' * (100 * 1024 * 1024))", limits={"output_bytes": 1 << 20})
    assert len(r.stdout) < (1 << 20) + 200
    assert "[... stdout truncated" in r.stdout


def test_stderr_overflow_keeps_the_report(runner):
    r = cell(runner, "import sys\nsys.stderr.write('e' * 3_000_000)\nval = 5",
             limits={"output_bytes": 1 << 20})  # fmt: skip
    assert "[... stderr truncated" in r.stderr
    assert r.locals["val"].preview == "5"


def test_the_report_survives_a_cap_that_cuts_it(runner):
    """The cap falls inside the driver's report (or its marker): the error is still the user's."""
    code = "raise ValueError('v' * 300)"
    size = len(cell(runner, code).stderr.encode())
    for cap in (size + 5, size + 60, size + 200):
        r = cell(runner, code, limits={"output_bytes": cap})
        assert r.error.type == "ValueError", (cap, r.error)
        assert "\x1e" not in r.stderr and "rlm-report" not in r.stderr


def test_deep_recursion_is_an_error_not_a_crash(runner):
    r = cell(runner, "def f(n): return f(n + 1)\nf(0)")
    assert r.error is not None
    assert r.error.type in ("RecursionError", "TimeoutError", "ResourceError")
    assert cell(runner, "print(1)").stdout == "1\n"


# ----------------------------------------------------------------------------- escapes

ESCAPES = {
    "passwd": "open('/etc/passwd').read()",
    "environ-file": "open('/proc/self/environ').read()",
    "subprocess": "import subprocess\nsubprocess.run(['id'])",
    "system": "import os\nassert os.system('id') == 0",
    "fork": "import os\nos.fork()",
    "ctypes": "import ctypes\nctypes.CDLL(None).getpid()",
    "write-outside": "open('/tmp/escaped', 'w').write('x')",
    "write-mount": "open('/rlm/other', 'w').write('x')",
    "list-root": "import os\nos.listdir('/')",
}


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_escape_attempts_fail(runner, name):
    r = cell(runner, ESCAPES[name])
    assert r.error is not None, f"{name} did not fail: {r.stdout}"
    assert not os.path.exists("/tmp/escaped")


def test_host_secrets_are_invisible(runner, monkeypatch):
    monkeypatch.setenv("LLM_API_KEY", "sk-host-secret")
    r = cell(runner, "import os\nprint(sorted(os.environ))\nprint(os.environ.get('LLM_API_KEY'))")
    assert "sk-host-secret" not in r.stdout
    assert r.stdout.splitlines()[-1] == "None"


def test_network_reaches_nothing(runner):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    accepted = []

    def accept():
        with contextlib.suppress(OSError):
            accepted.append(listener.accept())

    thread = threading.Thread(target=accept)
    thread.start()
    attempts = [
        f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
        f"import http.client\nc = http.client.HTTPConnection('127.0.0.1', {port}, timeout=1)\n"
        "c.request('GET', '/')",
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
    ]
    for code in attempts:
        assert cell(runner, code).error is not None
    thread.join()
    listener.close()
    assert accepted == []


def test_crafted_pickle_runs_only_inside_the_guest(runner):
    class Evil:
        def __reduce__(self):
            return (exec, ("open('/tmp/pwned-by-pickle', 'w').write('x')",))

    blob = pickle.dumps({"evil": Evil()})
    request = ExecuteRequest(
        code="print('never')",
        session_id="evil-pickle",
        state={"ref": sha256_hex(blob), "data": pack_state(blob)},
    )
    with pytest.raises(BadCell, match="could not be loaded"):
        runner.run(request)
    assert not os.path.exists("/tmp/pwned-by-pickle")


def test_corrupt_state_blob_is_refused(runner):
    blob = b"not a pickle at all"
    with pytest.raises(BadCell, match="could not be loaded"):
        runner.run(
            ExecuteRequest(
                code="1",
                session_id="corrupt",
                state={"ref": sha256_hex(blob), "data": pack_state(blob)},
            )
        )
    huge = base64.b64encode(zlib.compress(b"0" * (600 << 20))).decode()
    bad = [
        ({"ref": "a" * 64, "data": pack_state(b"x")}, "does not match"),
        ({"ref": "a" * 64, "data": "AAAA"}, "not base64 of a zlib"),
        ({"ref": "a" * 64, "data": "%%%"}, "not base64 of a zlib"),
        ({"ref": "a" * 64, "data": huge}, "unpacks to more than"),
    ]
    for state, words in bad:
        with pytest.raises(BadCell, match=words):
            runner.run(ExecuteRequest(code="1", session_id="corrupt", state=state))


def test_eviction_under_memory_pressure_falls_back_to_restore():
    from functions.execute.cells import CellRunner
    from functions.execute.settings import MIB, ExecuteSettings

    # Room for one live interpreter (each is charged its linear memory, ~40 MB idle): the other
    # session is evicted and restored from its blob.
    small = CellRunner(ExecuteSettings(cache_bytes=120 * MIB, queue_wait_s=30))
    try:
        refs: dict[str, str | None] = {"a": None, "b": None}
        for step in range(3):
            for sid in ("a", "b"):
                state = {"ref": refs[sid]} if refs[sid] else None
                code = f"n = {sid!r} * {step + 1}" if step == 0 else "n += n[0]\nprint(n)"
                r = small.run(ExecuteRequest(code=code, session_id=sid, state=state, scope=SCOPE))
                assert r.error is None, r.error
                refs[sid] = r.state.ref
                if step:
                    assert r.stdout == sid * (step + 1) + "\n"
                assert len(small.sessions) == 1
    finally:
        small.close()

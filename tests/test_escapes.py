"""Model output that tries to run away, through infer and execute as real processes: each is
stopped by its limit and the run goes on (or ends) with the reason visible."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from functions.infer.prompts import final_request_message
from functions.testing.scripted_model import repl, scripted_replies
from tests.conftest import Served, free_port, infer_env, serve


@pytest.fixture(scope="module")
def infer(tmp_path_factory, scripted_llm, execute_server) -> Iterator[Served]:
    """Infer on the session's execute, whose sub-call cap is 5 per cell."""
    port = free_port()
    env = infer_env(scripted_llm, execute_server.url, port, MAX_ITERATIONS="3")
    served = serve("infer", env, tmp_path_factory.mktemp("escapes"), port=port)
    yield served
    served.stop()


def run(infer: Served, **body) -> dict:
    r = httpx.post(infer.url + "/infer", json={"query": "q", "context": "c", **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_endless_sub_calls_hit_the_cap_and_the_run_goes_on(infer, llm):
    llm.switch.current = scripted_replies(
        [
            repl(
                "n = 0\ntry:\n    while True:\n        llm_query('again')\n        n += 1\n"
                "except Exception as e:\n    print(type(e).__name__, n, e)"
            ),
            lambda request: f"FINAL({request.texts('user')[-1].strip()[-200:]})",
        ]
    )
    body = run(infer, trajectory=True)
    assert body["status"] == "completed", body
    assert "SubcallError 5" in body["answer"] and "at most 5 per cell" in body["answer"]
    assert body["usage"]["scripted-sub"]["calls"] == 5


def test_a_gigabyte_of_print_is_truncated_and_the_run_goes_on(infer, llm, execute_server):
    llm.switch.current = scripted_replies(
        [
            repl(
                "import sys\nline = 'x' * (16 << 20)\nfor _ in range(64):\n"
                "    sys.stdout.write(line)\nkept = 7"
            ),  # 1 GiB
            repl("print('kept', kept)"),
            "FINAL(done)",
        ]
    )
    body = run(infer, trajectory=True)
    cells = [e for e in body["trajectory"] if e["kind"] == "cell"]
    assert "[... stdout truncated" in cells[0]["stdout"] and len(cells[0]["stdout"]) < 2 << 20
    assert cells[1]["stdout"] == "kept 7\n"
    assert body["status"] == "completed" and body["answer"] == "done"
    assert execute_server.process.poll() is None


def test_a_model_that_never_finishes_gets_the_final_request(infer, llm):
    llm.switch.current = scripted_replies(
        [repl("print('still looking')")] * 3 + ["It must be this.\nFINAL(forty-two)"]
    )
    body = run(infer)
    assert body["iterations"] == 3 and body["stop_code"] == "max_iterations", body
    assert body["status"] == "completed" and body["answer"] == "forty-two"
    roots = [r for r in llm.requests if r.is_root]
    assert len(roots) == 4 and roots[-1].last.endswith(final_request_message())

"""Cancelling a run: by request, by a client that goes away, and from the SDK."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from functions.sdk import RLM
from functions.testing.scripted_model import repl, scripted_replies

SLOW_S = 8.0  # a sub-call the cell waits on; cancelling must not wait for it


@pytest.fixture
def slow_subcalls(llm):
    """Root turns run a cell that waits on one slow sub-call; released at teardown."""
    release = threading.Event()
    llm.reset()  # counts from zero

    def slow(request):
        release.wait(SLOW_S)
        return "late"

    llm.switch.current = scripted_replies([repl("r = llm_query('slow')\nprint(r)")], slow)
    yield llm
    release.set()
    llm.wait_idle()


def wait_for_subcall(llm, timeout_s: float = 30) -> None:
    """Until the cell's sub-call has reached the model (the run is inside the cell)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if llm.received >= 2:  # the root turn, then the sub-call
            time.sleep(0.2)
            return
        time.sleep(0.02)
    raise AssertionError("the sub-call never arrived")


def test_cancel_endpoint_stops_a_cell_waiting_on_a_sub_call(stack, slow_subcalls):
    run_id = "cancel-me-1"
    answer: dict = {}
    mine = {"x-rlm-cancel-token": "a-secret-of-the-caller"}

    def post():
        r = httpx.post(stack.infer.url + "/infer", json={"query": "q", "context": "c",
                       "run_id": run_id}, headers=mine, timeout=60)  # fmt: skip
        answer["at"], answer["response"] = time.monotonic(), r

    client = threading.Thread(target=post)
    client.start()
    wait_for_subcall(slow_subcalls)
    for stranger in ({}, {"x-rlm-cancel-token": "a-guess-of-somebody-else"}):
        r = httpx.post(f"{stack.infer.url}/infer/{run_id}/cancel", headers=stranger, timeout=10)
        assert r.status_code == 403, r.text  # knowing the run id is not enough
    asked = time.monotonic()
    r = httpx.post(f"{stack.infer.url}/infer/{run_id}/cancel", headers=mine, timeout=10)
    assert r.status_code == 202 and r.json() == {"run_id": run_id, "cancelled": True}
    client.join(30)
    latency = answer["at"] - asked
    result = answer["response"].json()
    assert result["status"] == "stopped" and result["stop_reason"] == "cancelled", result
    assert result["usage"]["scripted-root"]["calls"] == 1  # usage so far is reported
    assert latency < 3.0, f"cancel took {latency:.2f} s"  # the benchmark reports the figure
    r = httpx.post(f"{stack.infer.url}/infer/{run_id}/cancel", headers=mine, timeout=10)
    assert r.status_code == 404  # no longer running


def test_client_going_away_cancels_a_streamed_run(stack, slow_subcalls):
    with httpx.stream("POST", stack.infer.url + "/infer", json={"query": "q", "context": "c"},
                      headers={"accept": "text/event-stream"}, timeout=60) as r:  # fmt: skip
        lines = r.iter_lines()
        assert next(lines) == "event: run"
        run_id = json.loads(next(lines)[len("data: ") :])["run_id"]
        wait_for_subcall(slow_subcalls)
    end = time.monotonic() + 5
    while time.monotonic() < end:  # the run ends soon after the client left
        status = httpx.post(f"{stack.infer.url}/infer/{run_id}/cancel", timeout=10).status_code
        if status == 404:
            break
        time.sleep(0.1)
    assert status == 404


def stopped_runs(stack) -> float:
    """How many runs infer has ended as stopped (its /metrics), without touching any run."""
    text = httpx.get(stack.infer.url + "/metrics", timeout=10).text
    prefix = 'rlm_inference_requests_total{status="stopped"}'
    return next((float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith(prefix)), 0.0)  # fmt: skip


def test_client_going_away_cancels_a_plain_run(stack, slow_subcalls):
    before = stopped_runs(stack)
    body = json.dumps({"query": "q", "context": "c"}).encode()
    host, port = stack.infer.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        client.sendall(b"POST /infer HTTP/1.1\r\nHost: infer\r\nContent-Type: application/json"
                       b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        wait_for_subcall(slow_subcalls)
        client.settimeout(1.5)
        with pytest.raises(TimeoutError):
            client.recv(1)  # no answer yet: the run goes on while its client waits
        assert stopped_runs(stack) == before
    end = time.monotonic() + 5  # the client hung up: the run stops long before SLOW_S
    while stopped_runs(stack) == before and time.monotonic() < end:
        time.sleep(0.1)
    assert stopped_runs(stack) == before + 1


def test_sdk_cancel_reports_usage_so_far(slow_subcalls):
    base = {"base_url": slow_subcalls.base_url, "api_key": "k", "model_name": "scripted-root"}
    with RLM(base) as rlm:
        threading.Thread(target=lambda: (wait_for_subcall(slow_subcalls), rlm.cancel())).start()
        result = rlm.completion("ctx", root_prompt="q")
    assert result.status == "stopped" and result.metadata["stop_reason"] == "cancelled"
    assert result.usage["scripted-root"].calls == 1
    assert result.execution_time < SLOW_S


def test_sdk_acompletion_task_cancellation_cancels_the_run(slow_subcalls):
    import asyncio

    base = {"base_url": slow_subcalls.base_url, "api_key": "k", "model_name": "scripted-root"}

    async def main(rlm):
        task = asyncio.create_task(rlm.acompletion("ctx", root_prompt="q", run_id="async-1"))
        await asyncio.to_thread(wait_for_subcall, slow_subcalls)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # the run itself ends soon after
            if rlm.cancel("async-1") == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    with RLM(base) as rlm:
        assert asyncio.run(main(rlm))


def test_cancel_is_in_the_openapi_document(stack):
    doc = httpx.get(stack.infer.url + "/openapi.json", timeout=10).json()
    assert "post" in doc["paths"]["/infer/{run_id}/cancel"]
    assert {"CancelReply", "ToolSpec"} <= doc["components"]["schemas"].keys()


def test_a_chosen_cancel_token_too_short_or_too_long_is_refused_before_the_run(stack, llm):
    """A caller's own cancel token must be a secret worth the name: 16 to 200 characters."""
    llm.reset()
    for token in ("short", "x" * 201):
        r = httpx.post(stack.infer.url + "/infer", json={"query": "q", "context": "c"},
                       headers={"x-rlm-cancel-token": token}, timeout=30)  # fmt: skip
        assert r.status_code == 400 and "x-rlm-cancel-token" in r.json()["error"], r.text
    assert llm.received == 0  # no run started, no model called

"""Reliability under load and faults: real processes on loopback, the scripted model as the LLM.

Saturation must show as 429/503 with Retry-After (honoured by the client and by infer), never
as a timeout or a 5xx; every run answers from its own context; killed or replaced processes,
a failing model and a failing callback end in a right answer or a clear reason.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent, from_http

from functions import events
from functions.contract import ExecuteRequest, Limits
from functions.infer.executor import RemoteExecutor, ReplSession
from functions.testing.load import (
    ANSWER,
    drive,
    load_policy,
    one_run,
    restarting,
    run_context,
    secret,
    start_stack,
)
from functions.testing.processes import serve
from functions.testing.scripted_model import Fault, repl, scripted_replies


@pytest.fixture(scope="module")
def rel(tmp_path_factory):
    """One small stack: 3 runs at once in infer, 1 execute slot that answers 503 quickly."""
    switch = {"policy": load_policy}
    stack = start_stack(
        lambda request: switch["policy"](request),
        tmp_path_factory.mktemp("reliability"),
        max_runs=3,
        execute_slots=1,
        queue_wait_s=0.05,
    )
    stack.switch = switch
    yield stack
    stack.stop()
    for old in stack.replaced:
        old.stop()


@pytest.fixture
def stack(rel):
    rel.model.reset()
    rel.switch["policy"] = load_policy
    yield rel
    rel.model.reset()
    rel.switch["policy"] = load_policy


def run(stack, index=0, timeout_s=90.0, **body):
    with httpx.Client(timeout=timeout_s) as client:
        return one_run(client, stack.infer.url, index, 20_000, time.monotonic() + timeout_s, **body)


# ----------------------------------------------------------------------------- load


def test_saturated_load_is_429_503_and_every_answer_is_its_own(stack):
    report = drive(stack, runs=8, timeout_s=120)
    assert report.problems() == []
    assert report.completed == 8 and report.wrong == 0 and report.leaked == 0
    assert report.timeouts == 0 and report.http_5xx == 0
    assert report.refused + report.execute_503 >= 1  # saturation was reached, and waited out


def test_runs_are_bounded_so_callbacks_find_a_thread():
    from functions.infer.settings import InferSettings

    settings = InferSettings(api_key="k", base_url="http://m", model="m", max_runs=32)
    assert settings.run_bound(threads=8) == 3  # 3 runs + 3 callbacks + 2 spare
    assert settings.run_bound(threads=200) == 32
    assert InferSettings(api_key="k", base_url="http://m", model="m", max_depth=3).run_bound(8) == 1


@pytest.fixture(scope="module")
def small_execute(tmp_path_factory):
    """Two slots that answer 503 after 0.2 s; room for one live session (each is charged its
    ~40 MB of linear memory; the rest are evicted)."""
    env = {"EXECUTE_CONCURRENCY": "2", "EXECUTE_QUEUE_WAIT": "0.2", "EXECUTE_CACHE_MB": "120",
           "EXECUTE_SUBCALL_TIMEOUT": "30"}  # fmt: skip
    served = serve("execute", env, tmp_path_factory.mktemp("small"), ready="/health/readiness")
    yield served
    served.stop()


def test_infer_waits_out_a_saturated_execute(small_execute):
    sleepers = [
        threading.Thread(target=httpx.post, args=(small_execute.url + "/execute",),
                         kwargs={"json": {"code": "import time; time.sleep(4)"}, "timeout": 60})
        for _ in range(2)
    ]  # fmt: skip
    for t in sleepers:
        t.start()
    time.sleep(0.5)
    executor = RemoteExecutor(small_execute.url, retries=1)  # saturation is not counted
    try:
        saturated = httpx.post(small_execute.url + "/execute", json={"code": "1"}, timeout=10)
        assert saturated.status_code == 503 and saturated.headers["retry-after"]
        r = executor.run(ExecuteRequest(code="print('in')", limits=Limits(deadline_s=30)))
        assert r.stdout == "in\n"
    finally:
        executor.close()
        for t in sleepers:
            t.join()


def test_many_sessions_at_once_see_only_their_own_variables(small_execute):
    executor = RemoteExecutor(small_execute.url)
    seen: dict[int, list[str]] = {}

    def session(i: int) -> None:
        repl_session = ReplSession(executor, f"many-{i}", f"context of {i}", Limits(deadline_s=30),
                                   lambda replay: None)  # fmt: skip
        mine = "sorted(k for k in globals() if k.startswith('mine_'))"
        cells = [f"mine_{i} = True\nv = {i * 1000}", "v += 1", "v += 1",
                 f"print(v, context, {mine})"]  # fmt: skip
        seen[i] = [repl_session.run(code).stdout for code in cells]

    threads = [threading.Thread(target=session, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        executor.close()
    for i in range(8):
        assert seen[i][-1] == f"{i * 1000 + 2} context of {i} ['mine_{i}']\n", seen[i]
    metrics = httpx.get(small_execute.url + "/metrics", timeout=10).text
    assert "wasm_live_sessions 1.0" in metrics  # the others were evicted and restored


# ----------------------------------------------------------------------------- faults


def test_execute_killed_mid_cell(stack):
    """SIGKILL while a cell sleeps; the cell is re-sent to a fresh process on the same port."""
    started, restarts = threading.Event(), []

    def policy(request):
        if not request.is_root:
            started.set()
            return "ok"
        steps = [repl("n = 41"), repl("llm_query('started')\nimport time\ntime.sleep(2)\nn += 1"),
                 repl("answer['content'] = str(n)\nanswer['ready'] = True")]  # fmt: skip
        return steps[min(request.turn, 2)]

    def killer():
        if started.wait(60):
            time.sleep(0.3)  # the cell is in its sleep
            restarts.append(stack.restart("execute"))

    stack.switch["policy"] = policy
    thread = threading.Thread(target=killer)
    thread.start()
    out = run(stack)
    thread.join()
    assert restarts, "execute was not killed"
    assert out.status == "completed" and out.answer == "42", out


def test_fresh_execute_for_every_cell(stack):
    stack.switch["policy"], starts = restarting(stack, load_policy)
    out = run(stack, index=5)
    assert len(starts) == 2  # both cells ran on a process that had never seen the run
    assert out.status == "completed" and out.answer == secret(5), out


def test_model_faults_in_bursts_are_retried_within_the_deadline(stack):
    stack.model.inject(Fault(status=429, retry_after=0.2), Fault(status=500), Fault(drop=True),
                       Fault(delay_s=0.5), times=3)  # fmt: skip
    out = run(stack, index=3, max_timeout_s=30)
    assert out.status == "completed" and out.answer == secret(3), out
    assert out.latency_s < 30 + 5


def test_slow_model_stops_at_max_timeout_with_the_partial_answer(stack):
    stack.switch["policy"] = scripted_replies([repl("answer['content'] = 'partial'"), ANSWER])
    stack.model.latency_s = 2.5
    out = run(stack, max_timeout_s=3)
    assert out.latency_s < 3 + 3
    assert out.status == "stopped" and out.answer == "partial", out


def test_infer_killed_mid_event_then_redelivered(stack):
    """No reply from the dead process; the redelivery runs again and is answered once."""
    in_cell = threading.Event()

    def policy(request):
        if not request.is_root and not in_cell.is_set():
            in_cell.set()
            time.sleep(1)
        return load_policy(request)

    def killer():
        if in_cell.wait(60):
            stack.restart("infer")

    stack.switch["policy"] = policy
    event = CloudEvent({"type": events.INFER_REQUESTED, "source": "/tests"},
                       {"query": "magic?", "context": run_context(7, 20_000)})  # fmt: skip
    headers, body = to_binary(event)
    thread = threading.Thread(target=killer)
    thread.start()
    with pytest.raises(httpx.HTTPError):
        httpx.post(stack.infer.url + "/", headers=headers, content=body, timeout=60)
    thread.join()
    replies = []
    for _ in range(2):
        r = httpx.post(stack.infer.url + "/", headers=headers, content=body, timeout=60)
        replies.append(from_http(dict(r.headers), r.content))
    assert [x["type"] for x in replies] == [events.INFER_COMPLETED] * 2
    assert replies[0].data["answer"] == secret(7)
    assert replies[0].data["run_id"] == replies[1].data["run_id"]  # one run for the redeliveries


CATCH = "try:\n    llm_query('q')\nexcept Exception as e:\n    print('caught', type(e).__name__, e)"


def test_callback_that_hangs_or_refuses_is_an_exception_the_cell_catches(small_execute):
    url = small_execute.url + "/execute"
    hanging = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers
    callback = {"url": f"http://127.0.0.1:{hanging.getsockname()[1]}/subcalls", "token": "t"}
    body = {"code": CATCH, "limits": {"deadline_s": 2}, "callback": callback}
    try:
        r = httpx.post(url, json=body, timeout=30)
    finally:
        hanging.close()  # the abandoned sub-call's connection is reset: its thread ends
    assert r.status_code == 200, r.text
    assert r.json()["stdout"].startswith("caught"), r.json()
    refused = {**body, "callback": {"url": "http://127.0.0.1:9/subcalls", "token": "t"}}
    r = httpx.post(url, json=refused, timeout=30)
    assert "caught" in r.json()["stdout"] and "could not reach" in r.json()["stdout"]
    time.sleep(1)
    # The abandoned sub-call gave its slot back once and took none: both slots serve cells.
    results: list[int] = []
    sleepers = [threading.Thread(target=lambda: results.append(httpx.post(
        url, json={"code": "import time; time.sleep(1)"}, timeout=30).status_code))
        for _ in range(2)]  # fmt: skip
    for t in sleepers:
        t.start()
    for t in sleepers:
        t.join()
    assert results == [200, 200]


def test_model_failing_a_subcall_is_an_exception_the_cell_catches(stack):
    def first_turn(request):
        stack.model.inject(Fault(status=400))  # the next model request is the cell's sub-call
        return repl(CATCH + "\nanswer.update(content='after', ready=True)")

    stack.switch["policy"] = scripted_replies([first_turn])
    r = httpx.post(stack.infer.url + "/infer", timeout=60,
                   json={"query": "q", "context": "c", "trajectory": True})  # fmt: skip
    result = r.json()
    assert result["status"] == "completed" and result["answer"] == "after", result
    cell = next(e for e in result["trajectory"] if e["kind"] == "cell")
    assert cell["stdout"].startswith("caught") and "400" in cell["stdout"], cell

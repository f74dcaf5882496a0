"""Two infer processes sharing one Redis ledger behind a round-robin proxy, as two pods behind
a Knative route: whichever pod a request reaches, the run's rules hold."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent, from_http

from functions import events
from functions.testing.processes import Served, free_port, serve
from functions.testing.proxy import RoundRobin
from functions.testing.redis_server import PASSWORD, RedisServer
from functions.testing.scripted_model import repl, scripted_replies
from tests.conftest import infer_env
from tests.test_conversations import conversation_policy

PRICES = '{"scripted-root": [1.0, 2.0], "scripted-sub": [100.0, 100.0]}'


@dataclass
class Pods:
    a: Served
    b: Served
    proxy: RoundRobin
    redis: RedisServer
    execute: Served
    a_env: dict
    a_port: int
    tmp: object


@pytest.fixture(scope="module")
def pods(tmp_path_factory, scripted_llm) -> Iterator[Pods]:
    tmp = tmp_path_factory.mktemp("pods")
    redis = RedisServer(tmp).start()
    execute = serve("execute", {"EXECUTE_MAX_SUBCALLS": "200"}, tmp, ready="/health/readiness")
    port_a, port_b = free_port(), free_port()
    proxy = RoundRobin([f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"])
    shared = {"INFER_STORE_URL": redis.url, "INFER_STORE_PASSWORD": PASSWORD,
              "INFER_CALLBACK_URL": proxy.url, "LLM_PRICES": PRICES,
              "LLM_MAX_OUTPUT_TOKENS": "64", "INFER_CELL_SUBCALLS": "60",
              "LLM_MAX_RETRIES": "0"}  # fmt: skip
    a_env = infer_env(scripted_llm, execute.url, port_a, **shared)
    a = serve("infer", a_env, tmp, port=port_a)
    b = serve("infer", infer_env(scripted_llm, execute.url, port_b, **shared), tmp, port=port_b)
    pods = Pods(a, b, proxy, redis, execute, a_env, port_a, tmp)
    yield pods
    for served in (pods.a, pods.b, execute):
        served.stop()
    proxy.stop()
    redis.stop()


def ask(served: Served, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(served.url + "/infer", json=body, headers=headers, timeout=120)


def test_a_conversation_continues_on_the_other_pod_without_a_record(pods, llm):
    llm.switch.current = conversation_policy
    one = ask(pods.a, {"query": "Remember.", "context": "first-ctx", "persistent": True}).json()
    turn = {"query": "Recall.", "context": "second-ctx", "conversation_id": one["conversation_id"]}
    two = ask(pods.b, turn)
    assert two.status_code == 200, two.text
    assert two.json()["answer"] == "swordfish first-ctx second-ctx 3 True"


def _slow(llm, release: threading.Event):
    def slow(request):
        release.wait(20)
        return "late"

    llm.reset()
    llm.switch.current = scripted_replies([repl("r = llm_query('slow')\nprint(r)")], slow)


def _wait_for_subcall(llm) -> None:
    end = time.monotonic() + 30
    while llm.received < 2 and time.monotonic() < end:
        time.sleep(0.02)
    time.sleep(0.2)


def test_a_cancel_sent_to_the_other_pod_stops_the_run_and_strangers_are_refused(pods, llm):
    release = threading.Event()
    _slow(llm, release)
    mine = {"x-rlm-cancel-token": "the-callers-own-secret"}
    answer: dict = {}

    def post() -> None:
        answer["r"] = ask(pods.a, {"query": "q", "context": "c", "run_id": "pods-1"}, **mine)
        answer["at"] = time.monotonic()

    client = threading.Thread(target=post)
    client.start()
    try:
        _wait_for_subcall(llm)
        stranger = httpx.post(f"{pods.b.url}/infer/pods-1/cancel", timeout=10)
        assert stranger.status_code == 403, stranger.text
        asked = time.monotonic()
        r = httpx.post(f"{pods.b.url}/infer/pods-1/cancel", headers=mine, timeout=10)
        assert r.status_code == 202, r.text
        client.join(20)
        result = answer["r"].json()
        assert result["status"] == "stopped" and result["stop_code"] == "cancelled", result
        assert answer["at"] - asked < 5.0
    finally:
        release.set()
        llm.wait_idle()


def test_a_cells_priced_sub_calls_on_both_pods_stop_at_the_budget(pods, llm):
    code = (
        "answer['content'] = 'partial: none yet'\n"
        "done = 0\n"
        "for i in range(50):\n"
        "    try:\n"
        "        llm_query(f'question {i}')\n"
        "    except Exception as e:\n"
        "        print('refused:', e)\n"
        "        break\n"
        "    done += 1\n"
        "    answer['content'] = f'partial: {done} answered'\n"
    )
    llm.reset()
    llm.switch.current = scripted_replies([repl(code)])
    start = len(pods.proxy.served)
    budget = 0.1
    r = ask(pods.a, {"query": "q", "context": "c", "max_budget_usd": budget, "trajectory": True})
    body = r.json()
    assert r.status_code == 200, body
    assert body["status"] == "stopped" and body["stop_code"] == "max_budget_usd", body
    assert body["answer"].startswith("partial: ") and "answered" in body["answer"], body
    assert body["total_cost_usd"] <= budget, body  # no call made past the budget
    served = {pod for pod, path in pods.proxy.served[start:] if path == "/subcalls"}
    assert served == {0, 1}, "both pods served the cell's sub-calls"
    last_cell = [e for e in body["trajectory"] if e["kind"] == "cell"][-1]
    assert "refused:" in last_cell["stdout"] and "max_budget_usd" in last_cell["stdout"]


def test_tokens_of_an_ended_run_or_over_their_cap_are_refused_before_any_model_call(pods, llm):
    release = threading.Event()
    _slow(llm, release)
    start = len(pods.proxy.seen)
    client = threading.Thread(target=ask, args=(pods.a, {"query": "q", "context": "c"}))
    client.start()
    try:
        _wait_for_subcall(llm)
        _, headers, body = next(s for s in pods.proxy.seen[start:] if s[0] == "/subcalls")
        auth = {"authorization": headers["authorization"] if "authorization" in headers
                else headers["Authorization"]}  # fmt: skip
        before = llm.received
        over = {"kind": "llm", "prompts": ["p"] * 61}
        r = httpx.post(pods.b.url + "/subcalls", json=over, headers=auth, timeout=10)
        assert r.status_code == 200 and "at most 60" in r.json()["error"], r.text  # SubcallError
        assert llm.received == before
    finally:
        release.set()
        client.join(30)
        llm.wait_idle()
    before = llm.received
    for pod in (pods.a, pods.b):  # the run has ended: its token is dead everywhere
        r = httpx.post(pod.url + "/subcalls", content=body, headers={**auth,
                       "content-type": "application/json"}, timeout=10)  # fmt: skip
        assert r.status_code == 401 and "ended" in r.text, r.text
    assert llm.received == before


def test_a_cloudevent_redelivered_to_the_other_pod_is_answered_once(pods, llm):
    llm.reset()
    data = {"query": "What is the magic number?", "context": "x the magic number is 77 x"}

    def send(pod: Served, event: CloudEvent) -> CloudEvent:
        headers, body = to_binary(event)
        r = httpx.post(pod.url + "/", headers=headers, content=body, timeout=120)
        assert r.status_code == 200, r.text
        return from_http(dict(r.headers), r.content)

    event = CloudEvent({"type": events.INFER_REQUESTED, "source": "/producer-1"}, data)
    first = send(pods.a, event)
    calls = llm.received
    again = send(pods.b, event)
    assert again.data["run_id"] == first.data["run_id"] and llm.received == calls
    other = CloudEvent({"type": events.INFER_REQUESTED, "source": "/producer-2",
                        "id": event["id"]}, data)  # fmt: skip
    second = send(pods.b, other)  # the same id from another producer: another event
    assert second.data["run_id"] != first.data["run_id"] and llm.received > calls


def test_redis_going_away_mid_run_fails_it_clearly_then_503_until_it_is_back(pods, llm):
    release = threading.Event()
    _slow(llm, release)
    answer: dict = {}
    client = threading.Thread(
        target=lambda: answer.update(r=ask(pods.a, {"query": "q", "context": "c"}))
    )
    client.start()
    try:
        _wait_for_subcall(llm)
        pods.redis.stop()
        release.set()  # the sub-call returns into a run whose ledger is gone
        client.join(60)
        r = answer["r"]
        assert r.status_code in (502, 503), r.text
        assert "ledger" in r.json().get("error", ""), r.text
        for pod in (pods.a, pods.b):
            down = ask(pod, {"query": "q", "context": "c"})
            assert down.status_code == 503 and down.headers.get("retry-after"), down.text
            assert "ledger" in down.json()["error"]
    finally:
        release.set()
        if pods.redis.process is None:
            pods.redis.start()
        llm.wait_idle()
    llm.switch.current = llm.switch.default
    back = ask(pods.b, {"query": "What is the magic number?",
                        "context": "the magic number is 5"})  # fmt: skip
    assert back.status_code == 200 and back.json()["status"] == "completed", back.text
    assert json.loads(back.text)["answer"] == "5"


def test_a_run_whose_pod_dies_is_resumed_on_the_other_pod_calling_no_model_twice(
    pods, llm, tmp_path_factory
):
    """SIGKILL the infer process in the middle of a run served from a CloudEvent; the
    redelivery to the other pod resumes the run from its last checkpoint."""
    in_cell, release = threading.Event(), threading.Event()
    turn_one = repl("x = 41\nprint('turn one done')")
    turn_two = repl(
        "r = llm_query('slow')\nanswer['content'] = f'{x + 1} {r}'\nanswer['ready'] = True"
    )

    def slow(request):
        in_cell.set()
        release.wait(20)
        return "late"

    llm.reset()
    llm.switch.current = scripted_replies([turn_one, turn_two], slow)
    event = CloudEvent({"type": events.INFER_REQUESTED, "source": "/resume"},
                       {"query": "q", "context": "c"})  # fmt: skip
    headers, body = to_binary(event)
    first = threading.Thread(target=lambda: _post_quietly(pods.a, headers, body))
    first.start()
    try:
        assert in_cell.wait(60), "the run never reached its second cell"
        root_calls = len(llm.root_requests())
        assert root_calls == 2
        pods.a.kill()
        release.set()  # the sub-call's answer goes nowhere: its pod is gone
        first.join(30)
        deadline = time.monotonic() + 30
        while True:  # the broker redelivers until the run is answered
            r = httpx.post(pods.b.url + "/", headers=headers, content=body, timeout=120)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            assert r.status_code == 409, r.text  # the dead pod's heartbeat has not lapsed yet
            time.sleep(1)
        reply = from_http(dict(r.headers), r.content)
        assert reply["type"] == events.INFER_COMPLETED, reply.data
        assert reply.data["answer"] == "42 late", reply.data  # x from turn one's state
        assert len(llm.root_requests()) == root_calls, [
            len(q.messages) for q in llm.root_requests()
        ]  # no root turn asked again
    finally:
        release.set()
        pods.a = serve("infer", pods.a_env, pods.tmp, port=pods.a_port)


def _post_quietly(pod: Served, headers: dict, body: bytes) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the pod is killed under the request
        httpx.post(pod.url + "/", headers=headers, content=body, timeout=60)

"""Infer and execute as real processes on loopback; the scripted model plays the LLM."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent, from_http

from functions import events
from functions.testing.haystack import haystack
from functions.testing.scripted_model import Fault, repl, scripted_replies
from tests.conftest import TOKEN_KEY, free_port, infer_env, serve


def ask(stack, body, **kw):
    return httpx.post(stack.infer.url + "/infer", json=body, timeout=120, **kw)


def test_needle_in_a_multi_megabyte_context(stack, llm):
    r = ask(stack, {"query": "What is the magic number?", "context": haystack(3_000_000, 48213)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "completed" and body["answer"] == "48213"
    assert body["usage"]["scripted-root"]["calls"] == 2
    assert body["usage"]["scripted-sub"]["calls"] >= 30  # one sub-call per 100k chunk
    assert body["total_cost_usd"] > 0


def test_state_across_cells_and_final_var(stack, llm):
    llm.switch.current = scripted_replies(
        [
            repl("words = context.split()\ncounts = {w: words.count(w) for w in set(words)}"),
            repl("top = max(counts, key=counts.get)\nprint(top)"),
            "The most common word is in `top`.\nFINAL_VAR(top)",
        ]
    )
    r = ask(stack, {"query": "Most common word?", "context": "b a b c b a"})
    assert r.json()["answer"] == "b" and r.json()["iterations"] == 3


def test_final_text_ends_a_run(stack, llm):
    llm.switch.current = scripted_replies([repl("print(len(context))"), "FINAL(eleven (11))"])
    r = ask(stack, {"query": "How long?", "context": "hello world"})
    assert r.json()["answer"] == "eleven (11)"


def test_depth_two_recursion(stack, llm):
    def sub(request):
        return request.last.upper()

    root_steps = [
        repl("parts = rlm_query_batched([context[:5], context[5:]])\nprint(parts)"),
        repl("answer['content'] = ' '.join(parts)\nanswer['ready'] = True"),
    ]
    # Children (depth 1) see their prompt as context and ask one deeper child (depth 2),
    # which at max_depth degrades to a plain sub-model call.
    child_steps = [
        repl("inner = rlm_query('echo ' + context)\nFINAL(inner)"),
    ]

    def policy(request):
        if not request.is_root:
            return sub(request)
        system = request.messages[0]["content"]
        first_user = request.messages[1]["content"]
        if "plain llm_query calls" in system:  # the depth-2 child
            return repl("FINAL(llm_query('deep ' + context))")
        steps = child_steps if "`context` is a str of 5 characters" in first_user else root_steps
        return steps[min(request.turn, len(steps) - 1)]

    llm.switch.current = policy
    r = ask(stack, {"query": "q", "context": "helloworld", "max_depth": 2})
    body = r.json()
    assert body["status"] == "completed", body
    assert body["answer"] == "DEEP ECHO HELLO DEEP ECHO WORLD"


@pytest.mark.parametrize(
    ("budget", "reason"),
    [
        ({"max_iterations": 2}, "max_iterations"),
        ({"max_tokens": 3000}, "max_tokens"),
        ({"max_budget_usd": 0.004}, "max_budget_usd"),
        ({"max_errors": 2}, "max_errors"),
        ({"max_timeout_s": 1.5}, "max_timeout_s"),
    ],
)
def test_budgets_stop_with_a_partial_answer(stack, llm, budget, reason):
    code = "answer['content'] = 'partial so far'\n"
    if reason == "max_errors":
        code += "1/0"
    if reason == "max_timeout_s":
        code += "import time\ntime.sleep(1)"
    llm.switch.current = scripted_replies([repl(code)])
    r = ask(stack, {"query": "q", "context": "c", **budget})
    body = r.json()
    assert r.status_code == 200
    assert body["stop_reason"].startswith(reason), body
    assert body["status"] == "stopped" and body["stop_code"] == reason
    assert body["answer"] == "partial so far"
    # A budget is a promise: what was spent stays within it.
    assert body["total_tokens"] <= budget.get("max_tokens", 10**9), body
    assert body["total_cost_usd"] <= budget.get("max_budget_usd", 10**9), body


def test_time_budget_spent_inside_a_model_call_is_a_stop(stack, llm):
    """The deadline runs out while the model is answering: a budget stop, not a failed run."""
    llm.latency_s = 2.0
    r = ask(stack, {"query": "q", "context": "c", "max_timeout_s": 0.3})
    body = r.json()
    assert r.status_code == 200, body
    assert body["status"] == "stopped" and body["stop_reason"].startswith("max_timeout_s"), body


def test_forged_expired_and_out_of_scope_tokens(stack, llm):
    from functions.infer import tokens

    url = stack.infer.url + "/subcalls"
    body = {"kind": "llm", "prompts": ["hi"]}
    assert httpx.post(url, json=body, timeout=10).status_code == 401
    forged = tokens.mint(b"not-the-key-not-the-key-not-the-key!", _claims())
    r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {forged}"}, timeout=10)
    assert r.status_code == 401
    expired = tokens.mint(TOKEN_KEY.encode(), _claims(exp=1))
    r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {expired}"}, timeout=10)
    assert r.status_code == 401 and "expired" in r.json()["error"]
    good = tokens.mint(TOKEN_KEY.encode(), _claims())
    scoped = {**body, "model": "gpt-expensive"}
    r = httpx.post(url, json=scoped, headers={"Authorization": f"Bearer {good}"}, timeout=10)
    assert r.status_code == 200 and "(403)" in r.json()["error"]  # the guest's SubcallError
    assert "'gpt-expensive' is not allowed" in r.json()["error"] and r.json()["responses"] == []
    r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {good}"}, timeout=10)
    assert r.status_code == 401 and "run that has ended" in r.json()["error"]  # no such run
    assert llm.requests == []  # nothing above reached the model


def _claims(exp: int = 2_000_000_000):
    from functions.infer.tokens import TokenClaims

    return TokenClaims(
        run_id="r1", depth=0, max_depth=1, exp=exp, models=["scripted-root", "scripted-sub"],
        nonce="n", owner="anonymous", root="r1", prompts=10,
    )  # fmt: skip


def test_execute_restarted_mid_run(tmp_path, llm):
    """The execute process dies between cells; a new one on the same port serves the rest."""
    execute = serve("execute", {}, tmp_path, ready="/health/readiness")
    port = free_port()
    infer = serve("infer", infer_env(llm, execute.url, port), tmp_path, port=port)
    restarted = []

    def policy(request):
        if not request.is_root:
            return "sub"
        if request.turn == 1 and not restarted:
            execute.kill()
            restarted.append(serve("execute", {}, tmp_path, port=int(execute.url.rsplit(":", 1)[1]),
                                   ready="/health/readiness"))  # fmt: skip
        steps = [repl("big = 'x' * 2_000_000\nn = 41"), repl("n += 1\nprint(n)"),
                 repl("answer['content'] = str(n)\nanswer['ready'] = True")]  # fmt: skip
        return steps[min(request.turn, 2)]

    llm.switch.current = policy
    try:
        r = httpx.post(infer.url + "/infer", json={"query": "q", "context": "c"}, timeout=120)
        assert r.json()["answer"] == "42", r.text
    finally:
        infer.stop()
        execute.stop()
        for e in restarted:
            e.stop()


def test_llm_faults_are_retried(stack, llm):
    llm.inject(Fault(status=429, retry_after=0.1), Fault(status=500), Fault(drop=True))
    r = ask(stack, {"query": "magic?", "context": haystack(50_000, 777)})
    assert r.json()["answer"] == "777"


def test_llm_down_is_a_clear_failure(stack, llm):
    llm.inject(*[Fault(status=503) for _ in range(10)])
    r = ask(stack, {"query": "q", "context": "c"})
    assert r.status_code == 502
    assert r.json()["status"] == "failed" and "unavailable" in r.json()["error"]


def test_cloudevent_in_reply_out_and_redelivery(stack, llm):
    data = {"query": "magic?", "context": haystack(20_000, 99)}
    event = CloudEvent({"type": events.INFER_REQUESTED, "source": "/tests"}, data)
    for encode in (to_binary, to_structured):
        headers, body = encode(event)
        r = httpx.post(stack.infer.url + "/", headers=headers, content=body, timeout=120)
        reply = from_http(dict(r.headers), r.content)
        assert reply["type"] == events.INFER_COMPLETED and reply["subject"] == event["id"]
        assert reply.data["answer"] == "99"
    runs = {json.loads(ln).get("run_id") for ln in stack.infer.output().splitlines()
            if ln.startswith("{") and '"run ' in ln}  # fmt: skip
    assert reply.data["run_id"] in runs
    first = reply.data["run_id"]
    headers, body = to_binary(event)
    again = from_http(*_reply(stack, headers, body))
    assert again.data["run_id"] == first  # the same result, no second run


def _reply(stack, headers, body):
    r = httpx.post(stack.infer.url + "/", headers=headers, content=body, timeout=120)
    return dict(r.headers), r.content


def test_bad_event_and_bad_requests(stack, llm):
    event = CloudEvent({"type": events.INFER_REQUESTED, "source": "/t"}, {"context": "c"})
    reply = from_http(*_reply(stack, *to_binary(event)))
    assert reply["type"] == events.INFER_FAILED and "query" in reply.data["error"]
    assert ask(stack, {"context": "no query"}).status_code == 422
    assert ask(stack, {"query": "q", "max_budget_usd": -1}).status_code == 422
    r = ask(stack, {"query": "q", "context_uri": "file:///etc/passwd"})
    assert r.status_code == 422 and "embedded" in r.json()["error"]


def test_chat_completions_facade(stack, llm):
    client = openai.OpenAI(base_url=stack.infer.url + "/v1", api_key="unused")
    completion = client.chat.completions.create(
        model="rlm",
        messages=[
            {"role": "system", "content": haystack(30_000, 5150)},
            {"role": "user", "content": "What is the magic number?"},
        ],
    )
    assert completion.choices[0].message.content == "5150"
    assert completion.usage.total_tokens > 0
    stream = client.chat.completions.create(
        model="rlm", stream=True,
        messages=[{"role": "user", "content": haystack(10_000, 6)},
                  {"role": "user", "content": "What is the magic number?"}],
    )  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "6"


def test_progress_stream(stack, llm):
    with httpx.stream("POST", stack.infer.url + "/infer", timeout=60,
                      json={"query": "magic?", "context": haystack(20_000, 31)},
                      headers={"accept": "text/event-stream"}) as r:  # fmt: skip
        kinds = [ln[7:] for ln in r.iter_lines() if ln.startswith("event: ")]
    assert kinds[:2] == ["run", "turn"] and "code" in kinds and "output" in kinds
    assert kinds[-1] == "result"


def test_metrics_and_trajectory(stack, llm):
    r = ask(stack, {"query": "magic?", "context": haystack(20_000, 8), "trajectory": True})
    kinds = [e["kind"] for e in r.json()["trajectory"]]
    assert kinds[:3] == ["run", "llm", "cell"] and kinds[-1] == "final"
    text = httpx.get(stack.infer.url + "/metrics", timeout=10).text
    for name in ("rlm_inference_requests_total", "rlm_inference_duration_seconds",
                 "rlm_code_generated_total", "rlm_code_execution_requests_total"):  # fmt: skip
        assert name in text


def test_openapi_document(stack):
    doc = httpx.get(stack.infer.url + "/openapi.json", timeout=10).json()
    assert {"/infer", "/subcalls"} <= doc["paths"].keys()
    assert "InferRequest" in doc["components"]["schemas"]


def test_a_depth_above_the_deployments_max_depth_is_422(stack, llm):
    r = ask(stack, {"query": "q", "context": "c", "max_depth": 3})
    assert r.status_code == 422, r.text
    assert "MAX_DEPTH 2" in r.json()["error"]
    assert not llm.requests, "refused before any model call"

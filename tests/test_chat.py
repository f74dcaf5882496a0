"""The OpenAI-compatible facade, driven by the official `openai` client against infer and
execute as real processes: streaming at once, cancel on disconnect, extra_body, typed answers."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest
from pydantic import BaseModel

from functions.testing.haystack import haystack
from functions.testing.scripted_model import repl, scripted_replies, typed_answers
from tests.test_cancel import SLOW_S, slow_subcalls, wait_for_subcall  # noqa: F401

QUESTION = {"role": "user", "content": "What is the magic number?"}


def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.infer.url + "/v1", api_key="unused", max_retries=0)


def ours(chunk) -> dict | None:
    return (chunk.model_extra or {}).get("rlm")


def test_the_first_chunk_comes_at_once_and_progress_before_the_answer(stack, llm):
    llm.switch.current = scripted_replies([repl("print(len(context))"), "FINAL(done)"])
    llm.latency_s = 5.0  # two root turns: a run of about ten seconds
    started = time.monotonic()
    stream = client(stack).chat.completions.create(
        model="rlm", stream=True, messages=[{"role": "user", "content": "ctx"}, QUESTION]
    )
    seen: list[tuple[float, object]] = [(time.monotonic() - started, c) for c in stream]
    first_s, total_s = seen[0][0], seen[-1][0]
    print(f"first chunk after {first_s:.2f} s of a {total_s:.1f} s run")
    assert total_s > 9
    assert first_s < 2.0  # at once, not after the run (generous: the machine is shared)
    chunks = [c for _, c in seen]
    assert chunks[0].choices[0].delta.role == "assistant"
    events = [ours(c)["event"] for c in chunks if ours(c) and "event" in ours(c)]
    assert events[0] == "run" and "turn" in events and "output" in events
    texts = [c.choices[0].delta.content for c in chunks if c.choices]
    assert "".join(t or "" for t in texts) == "done"
    answer_at = next(t for t, c in seen if c.choices and c.choices[0].delta.content == "done")
    turn_at = next(t for t, c in seen if (ours(c) or {}).get("event") == "turn")
    assert turn_at < 2.0 < answer_at  # progress while the run worked, the answer at the end
    last = chunks[-1]
    assert last.choices[0].finish_reason == "stop" and last.usage.total_tokens > 0
    assert ours(last)["status"] == "completed" and ours(last)["total_cost_usd"] > 0


def test_usage_on_a_chunk_of_its_own_when_asked(stack, llm):
    stream = client(stack).chat.completions.create(
        model="rlm", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": haystack(10_000, 77)}, QUESTION],
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    assert [c for c in chunks[:-1] if c.usage] == []  # counted once


def test_a_disconnected_stream_cancels_its_run(stack, slow_subcalls):  # noqa: F811
    stream = client(stack).chat.completions.create(
        model="rlm", stream=True, messages=[{"role": "user", "content": "c"}, QUESTION]
    )
    run_id = next(ours(c)["run_id"] for c in stream if (ours(c) or {}).get("event") == "run")
    wait_for_subcall(slow_subcalls)  # the run waits in a cell on a slow sub-call
    stream.close()
    left = time.monotonic()
    while time.monotonic() - left < 5:  # the run ends soon after its client left
        gone = httpx.post(f"{stack.infer.url}/infer/{run_id}/cancel", timeout=10)
        if gone.status_code == 404:
            break
        time.sleep(0.1)
    assert gone.status_code == 404
    time.sleep(SLOW_S - (time.monotonic() - left) + 2)  # past the point the run went on
    assert slow_subcalls.received == 2  # the root turn and its sub-call: no call after


def test_a_plain_client_that_hangs_up_cancels_its_run(stack, slow_subcalls):  # noqa: F811
    body = json.dumps({"model": "rlm", "messages": [QUESTION]}).encode()
    host, port = stack.infer.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: infer\r\nContent-Type: "
        head += b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        raw.sendall(head + body)
        wait_for_subcall(slow_subcalls)
    time.sleep(SLOW_S + 2)
    assert slow_subcalls.received == 2


def test_extra_body_budgets_stop_a_run(stack, llm):
    looping = scripted_replies([repl("x = llm_query('magic number is 1')\nprint(x)")])
    llm.switch.current = looping
    chat = client(stack).chat.completions
    for fields, code in (
        ({"max_budget_usd": 0.0001}, "max_budget_usd"),
        ({"max_total_tokens": 500}, "max_tokens"),
        ({"max_iterations": 2}, "max_iterations"),  # no answer in its turns
    ):
        llm.requests.clear()
        done = chat.create(model="rlm", messages=[QUESTION], extra_body=fields)
        assert done.choices[0].finish_reason == "length", fields
        assert done.model_extra["rlm"]["stop_code"] == code, done.model_extra
    assert done.model_extra["rlm"]["iterations"] == 2
    stopped = chat.create(model="rlm", messages=[QUESTION], max_tokens=5)
    assert stopped.model_extra["rlm"]["stop_code"] == "max_iterations"  # OpenAI's max_tokens
    # is one reply's cap, not the run's


def test_extra_body_sub_model_depth_and_trajectory(stack, llm):
    llm.switch.current = scripted_replies(
        [repl("answer['content'] = llm_query('magic number is 5')\nanswer['ready'] = True")]
    )
    done = client(stack).chat.completions.create(
        model="rlm", messages=[QUESTION],
        extra_body={"sub_model": "scripted-root", "max_depth": 0, "trajectory": True},
    )  # fmt: skip
    assert done.choices[0].message.content == "5"
    assert [r.model for r in llm.sub_requests()] == ["scripted-root"]  # not LLM_SUB_MODEL
    kinds = [e["kind"] for e in done.model_extra["rlm"]["trajectory"]]
    assert "cell" in kinds and kinds[-1] == "final"
    with pytest.raises(openai.UnprocessableEntityError, match="MAX_DEPTH"):
        client(stack).chat.completions.create(
            model="rlm", messages=[QUESTION], extra_body={"max_depth": 7}
        )
    with pytest.raises(openai.UnprocessableEntityError, match="max_budget_usd"):
        client(stack).chat.completions.create(
            model="rlm", messages=[QUESTION], extra_body={"max_budget_usd": -1}
        )


def test_the_context_is_the_earlier_messages_as_sent(stack, llm):
    llm.switch.current = scripted_replies(
        [repl("answer['content'] = context\nanswer['ready'] = 1")]
    )
    earlier = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "report: sales up 3%"}]},
        {"role": "assistant", "content": "Noted.", "name": "analyst"},
    ]
    done = client(stack).chat.completions.create(model="rlm", messages=[*earlier, QUESTION])
    assert json.loads(done.choices[0].message.content) == earlier


class City(BaseModel):
    city: str
    count: int


def test_response_format_json_schema_with_the_openai_parse_helper(stack, llm):
    llm.switch.current = typed_answers(
        [{"city": "Paris", "count": "x"}, {"city": "Oslo", "count": 2}]
    )
    done = client(stack).chat.completions.parse(
        model="rlm", messages=[{"role": "user", "content": "Oslo Oslo"}, QUESTION],
        response_format=City,
    )  # fmt: skip
    assert done.choices[0].message.parsed == City(city="Oslo", count=2)
    assert done.model_extra["rlm"]["value"] == {"city": "Oslo", "count": 2}
    system = llm.root_requests()[0].messages[0]["content"]
    assert '"additionalProperties": false' in system  # the client's strict schema, as sent


def test_response_format_that_is_never_met_is_a_length_stop(stack, llm):
    llm.switch.current = typed_answers([{"city": 1}])
    with pytest.raises(openai.LengthFinishReasonError):
        client(stack).chat.completions.parse(model="rlm", messages=[QUESTION], response_format=City)
    stream = client(stack).chat.completions.create(
        model="rlm", stream=True, messages=[QUESTION],
        response_format={"type": "json_schema", "json_schema": {
            "name": "city", "schema": City.model_json_schema()}},
    )  # fmt: skip
    last = list(stream)[-1]
    assert last.choices[0].finish_reason == "length"
    assert ours(last)["stop_code"] == "output_schema"


def test_bad_chat_requests_are_clear_4xx(stack, llm):
    chat = client(stack).chat.completions
    with pytest.raises(openai.UnprocessableEntityError, match="no user message"):
        chat.create(model="rlm", messages=[{"role": "system", "content": "x"}])
    with pytest.raises(openai.UnprocessableEntityError, match="json_schema"):
        chat.create(model="rlm", messages=[QUESTION], response_format={"type": "json_schema"})
    with pytest.raises(openai.UnprocessableEntityError, match="Retrieval is disabled"):
        chat.create(model="rlm", messages=[QUESTION], stream=True, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {
                "$ref": "http://127.0.0.1:9/s.json"}}})  # fmt: skip
    assert llm.requests == []

"""What a run's result says, and what the model is told on each turn: the ways small models fail
(never answering, looping on a broken cell, rebinding `context`), played by the scripted model
against infer and execute as real processes, and embedded."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx
import pytest

from functions.infer.prompts import final_request_message
from functions.sdk import RLM
from functions.testing.haystack import haystack
from functions.testing.scripted_model import (
    answers_on_its_last_turn,
    loops_on_a_broken_cell,
    never_answers,
    rebinds_context,
    repl,
    scripted_replies,
)
from tests.conftest import ROOT


def ask(stack, **body) -> dict:
    body = {"query": "How long is it?", "context": "hello world", "trajectory": True, **body}
    r = httpx.post(stack.infer.url + "/infer", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def backend(model) -> dict[str, str]:
    return {"base_url": model.base_url, "api_key": "k", "model_name": "scripted-root"}


def entries(body: dict, kind: str) -> list[dict]:
    return [e for e in body["trajectory"] if e["kind"] == kind and e["depth"] == 0]


# ----------------------------------------------------------------------------- the outcome


def test_a_run_that_never_answers_is_stopped_not_completed(stack, llm):
    llm.switch.current = never_answers
    body = ask(stack, max_iterations=3)
    assert body["status"] == "stopped" and body["stop_code"] == "max_iterations", body
    assert body["answer"] is None and body["iterations"] == 3
    assert body["stop_reason"].startswith("max_iterations: no answer after 3 turns")
    [final] = entries(body, "final")
    assert final["status"] == "stopped" and final["stop_code"] == "max_iterations"
    assert final["final_request"] is False
    assert "I need to look a bit more" in final["last_reply"]  # kept, but not as the answer
    replies = entries(body, "llm")
    assert [r["final_request"] for r in replies] == [False, False, False, True]


def test_the_partial_answer_is_the_answer_of_a_stopped_run(stack, llm):
    llm.switch.current = scripted_replies([repl("answer['content'] = 'partial so far'")])
    body = ask(stack, max_iterations=2)
    assert body["status"] == "stopped" and body["stop_code"] == "max_iterations"
    assert body["answer"] == "partial so far"
    assert entries(body, "final")[0]["last_reply"].startswith("Let me run this.")


def test_an_answer_in_the_final_request_completes_at_the_limit(stack, llm):
    llm.switch.current = scripted_replies(
        [repl("x = 'eleven'")] * 2 + ["Here it is.\nFINAL_VAR(x)"]
    )
    body = ask(stack, max_iterations=2)
    assert body["status"] == "completed" and body["answer"] == "eleven"
    assert body["stop_code"] == "max_iterations"  # said: it came at the iteration limit
    assert "answered in the final request" in body["stop_reason"]
    [final] = entries(body, "final")
    assert final["final_request"] is True and "last_reply" not in final


@pytest.mark.parametrize(
    ("last_reply", "why"),
    [
        ("FINAL_VAR(nowhere)", "a variable that does not exist"),
        ("```repl\nanswer['content'] = 'x'\nanswer['ready'] = True\n```", "code is not run"),
        ("The answer is probably eleven.", "prose without FINAL"),
        ("FINAL(eleven", "a FINAL never closed: the reply was cut off"),
    ],
)
def test_a_final_request_without_a_protocol_answer_is_a_stop(stack, llm, last_reply, why):
    llm.switch.current = scripted_replies([repl("print(len(context))"), last_reply])
    body = ask(stack, max_iterations=1)
    assert body["status"] == "stopped" and body["stop_code"] == "max_iterations", why
    assert body["answer"] is None
    assert entries(body, "final")[0]["last_reply"] == last_reply


def test_ready_without_content_is_no_answer(stack, llm):
    llm.switch.current = scripted_replies(
        [repl("answer['ready'] = True"), repl("answer['content'] = 'eleven'")]
    )
    body = ask(stack, max_iterations=3)
    assert body["status"] == "completed" and body["answer"] == "eleven"
    assert body["iterations"] == 2 and body["stop_code"] is None
    second = llm.root_requests()[1]
    assert 'answer["content"] is not set' in second.last


def test_a_missing_final_var_is_shown_to_the_model(stack, llm):
    llm.switch.current = scripted_replies(
        [repl("total = 11"), "FINAL_VAR(totl)", "FINAL_VAR(total)"]
    )
    body = ask(stack, max_iterations=5)
    assert body["status"] == "completed" and body["answer"] == "11"
    assert body["iterations"] == 3
    told = llm.root_requests()[2].last
    assert "NameError" in told and "no variable named 'totl'" in told


def test_a_looping_model_is_told_and_stopped(stack, llm):
    llm.switch.current = loops_on_a_broken_cell
    body = ask(stack, max_iterations=4)
    assert body["status"] == "stopped" and body["stop_code"] == "max_iterations"
    assert body["answer"] is None
    roots = llm.root_requests()
    assert len(roots) == 5  # four turns and the final request, nothing more
    told = [r.last for r in roots[1:]]
    assert all("NameError" in m for m in told)
    assert "same code" not in told[0] and all("same code" in m for m in told[1:])
    assert "You have 3 turns left." in told[0] and "This is your last turn" in told[2]
    assert told[3].endswith(final_request_message())  # in the same message as the output
    assert all(m["role"] != roots[-1].messages[i + 1]["role"]
               for i, m in enumerate(roots[-1].messages[:-1]))  # fmt: skip


# ----------------------------------------------------------------------------- what is left


def test_the_last_turn_is_announced_and_used(stack, llm):
    llm.switch.current = answers_on_its_last_turn
    body = ask(stack, max_iterations=3)
    assert body["status"] == "completed" and body["answer"] == "11", body
    assert body["iterations"] == 3 and body["stop_code"] is None
    first = llm.root_requests()[0].messages[1]["content"]
    assert "You have 3 turns left." in first


def test_every_turn_states_the_budget_left(stack, llm):
    llm.switch.current = scripted_replies([repl("print(1)")] * 2 + [repl("FINAL('done')")])
    body = ask(stack, max_iterations=4, max_budget_usd=0.5, max_tokens=90_000, max_timeout_s=60)
    assert body["status"] == "completed"
    lefts = [
        re.search(r"You have (\d) turns left\. Budget left: \$([\d.]+), ([\d,]+) tokens, (\d+) s",
                  r.messages[-1]["content"])
        for r in llm.root_requests()
    ]  # fmt: skip
    assert all(lefts), [r.messages[-1]["content"] for r in llm.root_requests()]
    turns = [int(m.group(1)) for m in lefts]
    usd = [float(m.group(2)) for m in lefts]
    tokens = [int(m.group(3).replace(",", "")) for m in lefts]
    assert turns == [4, 3, 2]
    assert usd[0] == 0.5 and usd[0] > usd[1] > usd[2]  # spending shows
    assert tokens[0] == 90_000 and tokens[0] > tokens[1] > tokens[2]
    assert all(int(m.group(4)) <= 60 for m in lefts)


# ----------------------------------------------------------------------------- the trajectory


def test_the_trajectory_records_the_question_and_the_setup(stack, llm):
    llm.switch.current = scripted_replies([repl("print(1)"), "FINAL(one)"])
    body = ask(stack, query="What is in it?", max_iterations=5, max_errors=3)
    first = body["trajectory"][0]
    assert first["kind"] == "run" and first["query"] == "What is in it?"
    request = llm.root_requests()[0]
    assert first["system_prompt"] == request.messages[0]["content"]
    assert first["first_user_message"] == request.messages[1]["content"]
    assert len(first["system_prompt_sha256"]) == 64
    assert first["model"] == "scripted-root" and first["sub_model"] == "scripted-sub"
    assert (first["max_iterations"], first["max_errors"], first["max_depth"]) == (5, 3, 2)
    assert first["max_output_tokens"] == 4096 and first["chunk_chars"] == 100_000
    last = body["trajectory"][-1]
    assert last["kind"] == "final" and last["status"] == "completed"
    assert last["stop_code"] is None and last["answer"] == "one"


# ----------------------------------------------------------------------------- other surfaces


def test_the_chat_facade_says_length_for_a_run_without_an_answer(stack, llm):
    url = stack.infer.url + "/v1/chat/completions"
    body = {"model": "rlm", "messages": [{"role": "user", "content": "How long?"}]}
    llm.switch.current = never_answers
    reply = httpx.post(url, json=body, timeout=120).json()
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["choices"][0]["message"]["content"].startswith("[stopped: max_iterations")
    llm.switch.current = scripted_replies([repl("print(1)"), "FINAL(short)"])
    reply = httpx.post(url, json=body, timeout=120).json()
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["choices"][0]["message"]["content"] == "short"


def test_a_child_that_stops_is_reported_as_stopped_to_its_parent(stack, llm):
    def policy(request):
        if not request.is_root:
            return "sub"
        if "`context` is a str of 5 characters" in request.messages[1]["content"]:  # the child
            return repl("answer['content'] = 'half'")
        if request.turn == 0:
            return repl("print(rlm_query('hello'))")
        return f"FINAL({request.last.splitlines()[1]})"

    llm.switch.current = policy
    body = ask(stack, max_depth=1)
    assert body["status"] == "completed"
    assert body["answer"].startswith("[child RLM stopped: max_iterations: no answer after 6 turns")
    assert body["answer"].endswith("partial answer: half")


def test_output_caps_and_chunk_advice_embedded(llm, monkeypatch):
    """The setting reaches the wire: root and sub-calls each send the cap, and the chunk size
    the prompt advises fits the sub-model's window, so a model that follows it never
    overflows that window."""
    monkeypatch.setenv("LLM_MAX_OUTPUT_TOKENS", "1000")
    monkeypatch.setenv("LLM_CONTEXT_WINDOWS", json.dumps({"scripted-root": 12_000}))
    text = haystack(200_000, 31337)
    with RLM(backend(llm)) as rlm:
        result = rlm.completion(text, root_prompt="What is the magic number?")
    assert result.response == "31337"
    roots, subs = llm.root_requests(), llm.sub_requests()
    assert {r.max_tokens for r in [*roots, *subs]} == {1000}
    advised = (12_000 - 1_000 - 1_000) * 3 // 1000 * 1000  # 30,000 characters
    assert f"chunks of at most {advised:,} characters" in roots[0].messages[0]["content"]
    assert len(subs) == -(-len(text) // advised)  # the model followed the advice
    assert all(len(r.last) // 4 + 1 <= 12_000 - 1000 for r in subs)  # each fits the window


def test_a_reply_cut_at_the_cap_is_named_to_the_model(llm, monkeypatch):
    monkeypatch.setenv("LLM_MAX_OUTPUT_TOKENS", "30")
    monkeypatch.setattr(llm, "honour_cap", True)
    llm.switch.current = scripted_replies(
        [repl("x = 1\n" + "# thinking out loud\n" * 40), "FINAL(done)"]
    )
    with RLM(backend(llm)) as rlm:
        result = rlm.completion("some text", root_prompt="q")
    assert result.response == "done"
    assert llm.root_requests()[0].max_tokens == 30
    assert "cut off at the output limit" in llm.root_requests()[1].last


# ----------------------------------------------------------------------------- the scaffold


def test_a_model_that_rebinds_context_keeps_its_input_served(stack, llm):
    llm.switch.current = rebinds_context
    body = ask(stack, context="hello big world")
    assert body["status"] == "completed" and body["answer"] == "str of 15", body
    [first, _] = entries(body, "cell")
    assert "[rlm] this cell rebound context; restored." in first["stderr"]
    assert "rebound context" in llm.root_requests()[1].last  # the model is told


def test_a_model_that_rebinds_context_keeps_its_input_embedded(llm):
    llm.switch.current = rebinds_context
    with RLM(backend(llm)) as rlm:
        result = rlm.completion("hello big world", root_prompt="q")
    assert result.response == "str of 15"
    assert "rebound context" in llm.root_requests()[1].last


def test_rlm_ask_says_a_stop_on_one_line_and_exits_3(llm, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    env.update(LLM_BASE_URL=llm.base_url, LLM_API_KEY="k", LLM_MODEL="scripted-root",
               LLM_PRICES=json.dumps({"scripted-root": [1, 2]}))  # fmt: skip

    def rlm_ask() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "functions.cli", "ask", "How long?", "--context", "-", "-q",
             "--max-iterations", "2"],
            cwd=ROOT, env=env, input="hello world", capture_output=True, text=True, timeout=180,
        )  # fmt: skip

    llm.switch.current = never_answers
    done = rlm_ask()
    assert done.returncode == 3 and done.stdout == ""  # no reply passed off as the answer
    assert done.stderr.strip() == (
        "rlm: run stopped: max_iterations: no answer after 2 turns and the final request"
    )
    llm.switch.current = scripted_replies([repl("print(1)")] * 2 + ["FINAL(eleven)"])
    done = rlm_ask()
    assert done.returncode == 0 and done.stdout == "eleven\n"
    assert done.stderr.strip() == (
        "rlm: run completed: max_iterations: answered in the final request after 2 turns"
    )

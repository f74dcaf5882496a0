"""The scripted stand-in model, driven through the real openai client."""

from __future__ import annotations

import contextlib
import io
import random
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from functions.infer.parsing import Final, find_code_blocks, find_final
from functions.testing.scripted_model import (
    STAND_IN_NAME,
    Fault,
    ModelRequest,
    ScriptedModel,
    answer_from_prompt,
    needle_policy,
    repl,
    scripted_replies,
)

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = {"role": "system", "content": "You have a Python REPL with `context` in it."}


@pytest.fixture(scope="module")
def server() -> Iterator[ScriptedModel]:
    with ScriptedModel(needle_policy) as model:
        yield model


@pytest.fixture
def model(server: ScriptedModel) -> Iterator[ScriptedModel]:
    server.reset()
    server.policy = needle_policy
    server.api_key = None
    yield server
    server.reset()


def sdk(model: ScriptedModel, **options: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=model.base_url, api_key="sk-test", max_retries=0, **options)  # type: ignore[arg-type]


def chat(model: ScriptedModel, messages: list[dict], name: str = "scripted-root") -> str:
    reply = sdk(model).chat.completions.create(model=name, messages=messages)  # type: ignore[arg-type]
    return reply.choices[0].message.content or ""


def haystack(chars: int, needle: int) -> str:
    rng = random.Random(3)
    lines = [
        " ".join(rng.choices(["alpha", "beta", "gamma", "delta"], k=12)) for _ in range(chars // 70)
    ]
    lines[len(lines) * 2 // 3] = f"note: the magic number is {needle}"
    return "\n".join(lines)


# ----------------------------------------------------------------------------- protocol


def test_chat_completion_shape_and_usage(model: ScriptedModel) -> None:
    model.policy = lambda request: "hello there"
    reply = sdk(model).chat.completions.create(
        model="some-model", messages=[{"role": "user", "content": "x" * 40}]
    )
    assert reply.object == "chat.completion" and reply.model == "some-model"
    assert reply.choices[0].message.content == "hello there"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == 11 and reply.usage.completion_tokens == 3
    assert reply.usage.total_tokens == 14


def test_streaming_in_pieces_with_usage(model: ScriptedModel) -> None:
    text = "a streamed reply that is long enough to come in several pieces " * 3
    model.policy = lambda request: text
    chunks = list(
        sdk(model).chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text and len(pieces) > 3
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(text) // 4 + 1
    assert model.requests[-1].stream


def test_streaming_without_usage(model: ScriptedModel) -> None:
    chunks = list(
        sdk(model).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "magic number is 5"}], stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "5"
    assert all(c.usage is None for c in chunks)


def test_models_list(model: ScriptedModel) -> None:
    assert [m.id for m in sdk(model).models.list()] == [STAND_IN_NAME]


def test_the_request_log(model: ScriptedModel) -> None:
    chat(model, [SYSTEM, {"role": "user", "content": "q"}])
    chat(model, [{"role": "user", "content": "sub question"}], name="scripted-sub")
    assert [r.model for r in model.requests] == ["scripted-root", "scripted-sub"]
    assert len(model.root_requests()) == 1 and len(model.sub_requests()) == 1
    assert model.requests[1].messages == [{"role": "user", "content": "sub question"}]


def test_errors_are_openai_shaped(model: ScriptedModel) -> None:
    base = model.base_url
    bad = httpx.post(f"{base}/chat/completions", content=b"{not json")
    assert bad.status_code == 400 and "messages" in bad.json()["error"]["message"]
    assert httpx.post(f"{base}/embeddings", json={}).status_code == 404
    assert httpx.get(f"{base}/nothing").status_code == 404

    def broken(request: ModelRequest) -> str:
        raise KeyError("oops")

    model.policy = broken
    with pytest.raises(openai.InternalServerError, match="KeyError"):
        chat(model, [{"role": "user", "content": "q"}])


def test_api_key_is_checked_when_set(model: ScriptedModel) -> None:
    model.api_key = "sk-right"
    with pytest.raises(openai.AuthenticationError):
        chat(model, [{"role": "user", "content": "q"}])
    ok = openai.OpenAI(base_url=model.base_url, api_key="sk-right", max_retries=0)
    ok.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}])


# ----------------------------------------------------------------------------- faults


def test_queued_faults_hit_the_next_requests_in_order(model: ScriptedModel) -> None:
    model.inject(Fault(status=429, retry_after=2.5), Fault(status=500))
    url = f"{model.base_url}/chat/completions"
    body = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
    first = httpx.post(url, json=body)
    assert first.status_code == 429 and first.headers["retry-after"] == "2.5"
    assert first.json()["error"]["type"] == "rate_limit_error"
    assert httpx.post(url, json=body).status_code == 500
    assert httpx.post(url, json=body).status_code == 200
    assert model.received == 3 and len(model.requests) == 1


def test_faults_repeat_n_times(model: ScriptedModel) -> None:
    model.inject(Fault(status=503), times=2)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            chat(model, [{"role": "user", "content": "q"}])
    chat(model, [{"role": "user", "content": "q"}])


def test_dropped_connection(model: ScriptedModel) -> None:
    model.inject(Fault(drop=True))
    with pytest.raises(openai.APIConnectionError):
        chat(model, [{"role": "user", "content": "q"}])
    assert chat(model, [{"role": "user", "content": "magic number is 9"}]) == "9"


def test_delay_past_the_client_timeout(model: ScriptedModel) -> None:
    model.inject(Fault(delay_s=0.5))
    with pytest.raises(openai.APITimeoutError):
        sdk(model, timeout=0.1).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "q"}]
        )


def test_fixed_latency(model: ScriptedModel) -> None:
    import time

    model.latency_s = 0.2
    started = time.monotonic()
    chat(model, [{"role": "user", "content": "q"}])
    assert time.monotonic() - started >= 0.2


# ----------------------------------------------------------------------------- policies


def test_sub_model_answers_from_the_prompt() -> None:
    ask = lambda text: answer_from_prompt(ModelRequest("m", [{"role": "user", "content": text}]))  # noqa: E731
    assert ask("blah\nnote: the magic number is 4711\nblah") == "4711"
    assert ask("nothing to see") == "NONE"
    parts = [{"type": "text", "text": "the magic number is 8"}]
    assert answer_from_prompt(ModelRequest("m", [{"role": "user", "content": parts}])) == "8"


def test_root_detection_and_turns() -> None:
    root = ModelRequest("m", [SYSTEM, {"role": "user", "content": "q"}])
    assert root.is_root and root.turn == 0
    later = ModelRequest("m", [*root.messages, {"role": "assistant", "content": "a"}])
    assert later.turn == 1
    assert not ModelRequest("m", [{"role": "user", "content": "REPL"}]).is_root
    assert not ModelRequest("m", []).is_root


def test_needle_policy_plays_the_root_turn_by_turn() -> None:
    messages = [SYSTEM, {"role": "user", "content": "What is the magic number?"}]
    probe = needle_policy(ModelRequest("m", messages))
    [code] = find_code_blocks(probe)
    assert "type(context)" in code and "len(context)" in code
    assert find_final(probe) is None

    messages += [{"role": "assistant", "content": probe}, {"role": "user", "content": "str"}]
    search = needle_policy(ModelRequest("m", messages))
    [code] = find_code_blocks(search)
    assert "llm_query_batched(" in code and "100_000" in code
    assert "Find the magic number in this text. Reply with just the number or NONE." in code
    assert 'answer["ready"] = True' in code

    messages += [
        {"role": "assistant", "content": search},
        {"role": "user", "content": "REPL output:\n4 chunks searched; found: ['321']"},
    ]
    assert find_final(needle_policy(ModelRequest("m", messages))) == Final("text", "321")
    messages[-1] = {"role": "user", "content": "4 chunks searched; found: []"}
    assert find_final(needle_policy(ModelRequest("m", messages))) == Final("text", "NONE")


@pytest.mark.parametrize("shape", ["str", "list"])
def test_the_needle_search_code_finds_the_needle(model: ScriptedModel, shape: str) -> None:
    """The turn-2 code, run here by plain Python with sub-calls to the scripted sub-model."""
    text = haystack(450_000, 98765)
    context = text if shape == "str" else text.split("\n")
    client = sdk(model)

    def llm_query_batched(prompts: list[str], model: str | None = None) -> list[str]:
        def one(prompt: str) -> str:
            reply = client.chat.completions.create(
                model=model or "scripted-sub", messages=[{"role": "user", "content": prompt}]
            )
            return reply.choices[0].message.content or ""

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(one, prompts))

    turns = [SYSTEM, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    [code] = find_code_blocks(needle_policy(ModelRequest("m", turns)))
    namespace = {
        "context": context,
        "llm_query_batched": llm_query_batched,
        "answer": {"content": None, "ready": False},
    }
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code, namespace)
    assert namespace["answer"] == {"content": "98765", "ready": True}
    assert re.search(r"5 chunks searched; found: \['98765'\]", printed.getvalue())
    assert len(model.sub_requests()) == 5


def test_scripted_replies_in_order_last_repeats(model: ScriptedModel) -> None:
    model.policy = scripted_replies(
        [repl("x = 1"), lambda request: f"turn {request.turn}", "FINAL(done)"],
        sub_answer=lambda request: "sub says hi",
    )
    messages: list[dict] = [SYSTEM, {"role": "user", "content": "q"}]
    replies = []
    for _ in range(4):
        replies.append(chat(model, messages))
        messages += [
            {"role": "assistant", "content": replies[-1]},
            {"role": "user", "content": "."},
        ]
    assert find_code_blocks(replies[0]) == ["x = 1\n"]
    assert replies[1:] == ["turn 1", "FINAL(done)", "FINAL(done)"]
    assert chat(model, [{"role": "user", "content": "q"}]) == "sub says hi"


def test_scripted_replies_needs_a_reply() -> None:
    with pytest.raises(ValueError):
        scripted_replies([])


# ----------------------------------------------------------------------------- command line


def test_runs_as_a_module() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "functions.testing.scripted_model",
            "--port",
            str(port),
            "--scenario",
            "needle",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "stand-in" in line and "not a language model" in line
        url = line.rsplit(" at ", 1)[1].strip()
        client = openai.OpenAI(base_url=url, api_key="sk", max_retries=0)
        reply = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "the magic number is 12"}]
        )
        assert reply.choices[0].message.content == "12"
    finally:
        process.terminate()
        process.wait(10)

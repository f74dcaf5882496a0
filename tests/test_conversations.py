"""Persistent conversations over HTTP: real infer and execute processes, the scripted model."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from functions.local import Served
from functions.scripted_model import ChatRequest, repl
from tests.conftest import free_port, infer_env, serve

REMEMBER = repl(
    "secret = 'swordfish'\nanswer['content'] = f'stored {len(context)}'\nanswer['ready'] = True"
)
RECALL = repl(
    "answer['content'] = f'{secret} {context_0} {context} {len(history_0)} {history == history_0}'"
    "\nanswer['ready'] = True"
)


def conversation_policy(request: ChatRequest) -> str:
    """Question 1 keeps a variable; a later question answers from it and from context_0."""
    if not request.is_root:
        return "sub"
    return RECALL if "question 2 of a conversation" in request.messages[1]["content"] else REMEMBER


@dataclass
class Planes:
    infer: Served  # default conversation settings
    strict: Served  # a tiny expiry and size cap
    execute: Served
    execute_port: int
    tmp: object

    def restart_execute(self) -> None:
        self.execute.stop()
        self.execute = serve("execute", {}, self.tmp, port=self.execute_port,
                             ready="/health/readiness")  # fmt: skip


@pytest.fixture(scope="module")
def planes(tmp_path_factory, scripted_llm) -> Iterator[Planes]:
    tmp = tmp_path_factory.mktemp("conversations")
    port = free_port()
    execute = serve("execute", {}, tmp, port=port, ready="/health/readiness")
    p1, p2 = free_port(), free_port()
    infer = serve("infer", infer_env(scripted_llm, execute.url, p1), tmp, port=p1)
    strict_env = {"INFER_CONVERSATION_TTL": "0.001", "INFER_CONVERSATION_MAX_MB": "0.01"}
    strict = serve("infer", infer_env(scripted_llm, execute.url, p2, **strict_env), tmp, port=p2)
    planes = Planes(infer, strict, execute, port, tmp)
    yield planes
    for served in (planes.infer, planes.strict, planes.execute):
        served.stop()


def ask(served: Served, body: dict) -> httpx.Response:
    return httpx.post(served.url + "/infer", json=body, timeout=120)


def test_second_question_uses_the_first_ones_variables_and_context(planes, llm):
    llm.switch.current = conversation_policy
    first = ask(planes.infer, {"query": "Remember.", "context": "first-ctx", "persistent": True})
    assert first.status_code == 200, first.text
    one = first.json()
    assert one["answer"] == "stored 9" and one["conversation_id"]
    second = ask(planes.infer, {"query": "Recall.", "context": "second-ctx",
                                "conversation_id": one["conversation_id"]})  # fmt: skip
    assert second.status_code == 200, second.text
    two = second.json()
    # history_0: the first question's system prompt, user message and the reply that answered.
    assert two["answer"] == "swordfish first-ctx second-ctx 3 True", two
    assert two["conversation_id"] == one["conversation_id"]
    note = llm.root_requests()[-1].messages[1]["content"]
    assert "`context_0`" in note and "`history_0`" in note


def test_next_question_on_a_fresh_execute_process(planes, llm):
    llm.switch.current = conversation_policy
    one = ask(planes.infer, {"query": "Remember.", "context": "first-ctx", "persistent": True})
    conversation = one.json()["conversation_id"]
    planes.restart_execute()  # no live session, no blob, no context: all of it is re-sent
    two = ask(planes.infer, {"query": "Recall.", "context": "second-ctx",
                             "conversation_id": conversation})  # fmt: skip
    assert two.status_code == 200, two.text
    assert two.json()["answer"] == "swordfish first-ctx second-ctx 3 True"


def test_unknown_and_expired_conversations_are_404(planes, llm):
    llm.switch.current = conversation_policy
    unknown = ask(planes.infer, {"query": "q", "conversation_id": "nosuchconversation"})
    assert unknown.status_code == 404 and "expired or unknown" in unknown.json()["error"]
    one = ask(planes.strict, {"query": "Remember.", "context": "c", "persistent": True})
    assert one.status_code == 200 and one.json()["conversation_id"]
    again = ask(
        planes.strict, {"query": "Recall.", "conversation_id": one.json()["conversation_id"]}
    )
    assert again.status_code == 404, again.text
    assert "INFER_CONVERSATION_TTL" in again.json()["error"]


def test_conversation_over_its_size_cap_is_413(planes, llm):
    llm.switch.current = conversation_policy
    too_big = ask(planes.strict, {"query": "q", "context": "x" * 20_000, "persistent": True})
    assert too_big.status_code == 413 and "exceeds" in too_big.json()["error"]
    # Under the cap to start with, over it once the turn's state is added: the next turn is 413.
    one = ask(planes.strict, {"query": "Remember.", "context": "y" * 9_000, "persistent": True})
    assert one.status_code == 200 and one.json()["answer"] == "stored 9000"
    again = ask(
        planes.strict, {"query": "Recall.", "conversation_id": one.json()["conversation_id"]}
    )
    assert again.status_code == 413, again.text
    assert "INFER_CONVERSATION_MAX_MB" in again.json()["error"]


def test_a_run_without_persistent_returns_no_conversation(planes, llm):
    llm.switch.current = conversation_policy
    body = ask(planes.infer, {"query": "Remember.", "context": "c"}).json()
    assert body["answer"] == "stored 1" and body["conversation_id"] is None

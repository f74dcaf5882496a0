"""Persistent conversations over HTTP: real infer and execute processes, the scripted model."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from functions.contract import ContextRef, StateRef, context_ref
from functions.infer.compaction import SUMMARY_REQUEST
from functions.infer.conversations import ConversationError, ConversationStore
from functions.infer.ledger import Ledger, MemoryStore
from functions.sdk import RLM
from functions.testing.processes import Served
from functions.testing.scripted_model import ModelRequest, repl
from functions.viewer import render
from tests.conftest import free_port, infer_env, serve
from tests.test_sdk import backend

REMEMBER = repl(
    "secret = 'swordfish'\nanswer['content'] = f'stored {len(context)}'\nanswer['ready'] = True"
)
RECALL = repl(
    "answer['content'] = f'{secret} {context_0} {context} {len(history_0)} {history == history_0}'"
    "\nanswer['ready'] = True"
)


def conversation_policy(request: ModelRequest) -> str:
    """Question 1 keeps a variable; a later question answers from it and from context_0."""
    if not request.is_root:
        return "sub"
    return RECALL if "question 2 of a conversation" in request.messages[1]["content"] else REMEMBER


@dataclass
class Planes:
    infer: Served  # default conversation settings
    strict: Served  # a tiny expiry and size cap
    other: Served  # another infer pod, holding none of `infer`'s conversations
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
    # MAX_ITERATIONS: the compaction test's run asks for 10 turns
    infer = serve("infer", infer_env(scripted_llm, execute.url, p1, MAX_ITERATIONS="10"), tmp,
                  port=p1)  # fmt: skip
    strict_env = {"INFER_CONVERSATION_TTL": "0.001", "INFER_CONVERSATION_MAX_MB": "0.01"}
    strict = serve("infer", infer_env(scripted_llm, execute.url, p2, **strict_env), tmp, port=p2)
    p3 = free_port()
    other = serve("infer", infer_env(scripted_llm, execute.url, p3), tmp, port=p3)
    planes = Planes(infer, strict, other, execute, port, tmp)
    yield planes
    for served in (planes.infer, planes.strict, planes.other, planes.execute):
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


def test_a_conversation_continues_on_another_infer_process(planes, llm):
    llm.switch.current = conversation_policy
    first = ask(planes.infer, {"query": "Remember.", "context": "first-ctx", "persistent": True})
    one = first.json()
    record = one["conversation"]
    assert record["id"] == one["conversation_id"] and record["state"]["data"]
    assert record["contexts"] == [{"ref": context_ref("first-ctx"), "data": None}]
    turn = {"query": "Recall.", "context": "second-ctx", "conversation_id": record["id"]}

    unknown = ask(planes.other, turn)
    assert unknown.status_code == 404 and "send `conversation`" in unknown.json()["error"]
    no_data = ask(planes.other, {**turn, "conversation": record})
    assert no_data.status_code == 422 and "contexts[0] has no data" in no_data.json()["error"]

    record["contexts"][0]["data"] = "first-ctx"
    planes.restart_execute()  # the state can only come from the record the caller kept
    second = ask(planes.other, {**turn, "conversation": record})
    assert second.status_code == 200, second.text
    assert second.json()["answer"] == "swordfish first-ctx second-ctx 3 True"
    refs = [c["ref"] for c in second.json()["conversation"]["contexts"]]
    assert refs == [context_ref("first-ctx"), context_ref("second-ctx")]


def test_next_question_on_a_fresh_execute_process(planes, llm):
    llm.switch.current = conversation_policy
    one = ask(planes.infer, {"query": "Remember.", "context": "first-ctx", "persistent": True})
    conversation = one.json()["conversation_id"]
    planes.restart_execute()  # no live session, no blob, no context: all of it is re-sent
    two = ask(planes.infer, {"query": "Recall.", "context": "second-ctx",
                             "conversation_id": conversation})  # fmt: skip
    assert two.status_code == 200, two.text
    assert two.json()["answer"] == "swordfish first-ctx second-ctx 3 True"


def second_question(served: Served, context: str) -> httpx.Response:
    """A first question that keeps a variable, then a second one in the same conversation."""
    one = ask(served, {"query": "Remember.", "context": context, "persistent": True})
    assert one.status_code == 200 and one.json()["answer"] == f"stored {len(context)}"
    return ask(served, {"query": "Recall.", "conversation_id": one.json()["conversation_id"]})


def test_unknown_and_expired_conversations_are_404(planes, llm):
    llm.switch.current = conversation_policy
    unknown = ask(planes.infer, {"query": "q", "conversation_id": "nosuchconversation"})
    assert unknown.status_code == 404 and "expired or unknown" in unknown.json()["error"]
    again = second_question(planes.strict, "c")
    assert again.status_code == 404, again.text
    assert "INFER_CONVERSATION_TTL" in again.json()["error"]


def test_conversation_over_its_size_cap_is_413(planes, llm):
    llm.switch.current = conversation_policy
    too_big = ask(planes.strict, {"query": "q", "context": "x" * 20_000, "persistent": True})
    assert too_big.status_code == 413 and "exceeds" in too_big.json()["error"]
    # Under the cap to start with, over it once the turn's state is added: the next turn is 413.
    again = second_question(planes.strict, "y" * 9_000)
    assert again.status_code == 413, again.text
    assert "INFER_CONVERSATION_MAX_MB" in again.json()["error"]


def test_a_run_without_persistent_returns_no_conversation(planes, llm):
    llm.switch.current = conversation_policy
    body = ask(planes.infer, {"query": "Remember.", "context": "c"}).json()
    assert body["answer"] == "stored 1" and body["conversation_id"] is None


STEP = repl(
    """
step = globals().get('step', 0) + 1
print('step', step, 'x' * 3000)
if step >= 7:
    full = globals().get('history', [])
    first = 'Question: Count' in full[1]['content'] if len(full) > 1 else False
    answer['content'] = f"{step} steps, first question in history: {first}"
    answer['ready'] = True
"""
)


def long_run_policy(request: ModelRequest) -> str:
    """Seven cells of 3,000 printed characters each; the REPL counts, so a summary loses nothing."""
    if not request.is_root:
        return "sub"
    if request.last == SUMMARY_REQUEST:
        return "Summary: the REPL variable `step` counts the cells run so far."
    return STEP


def test_compaction_keeps_the_run_going_and_history_in_the_repl(planes, llm):
    llm.switch.current = long_run_policy
    # 3% of the scripted model's default 128k-token window: about 15k characters.
    body = {"query": "Count to seven.", "context": "c", "compaction": True,
            "compaction_threshold": 0.03, "max_iterations": 10, "trajectory": True}  # fmt: skip
    r = ask(planes.infer, body)
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["answer"] == "7 steps, first question in history: True", result
    compactions = [e for e in result["trajectory"] if e["kind"] == "compaction"]
    assert compactions and compactions[0]["tokens_after"] < compactions[0]["limit_tokens"]
    assert compactions[0]["tokens_before"] >= compactions[0]["limit_tokens"]
    # Each request to the root after the summary starts from it, not from the earlier turns.
    after = [q for q in llm.root_requests() if q.last != SUMMARY_REQUEST and q.turn >= 1]
    assert any(q.messages[2]["content"].startswith("Summary:") for q in after)
    assert max(sum(len(m["content"]) for m in q.messages) for q in after) < 20_000


@pytest.mark.parametrize("environment", ["wasm", "remote"])
def test_sdk_persistent_conversation(llm, request, environment):
    llm.switch.current = conversation_policy
    options = {}
    if environment == "remote":
        options = {"url": request.getfixturevalue("execute_server").url}
    with RLM(backend(llm), persistent=True, environment=environment,
             environment_kwargs=options) as rlm:  # fmt: skip
        one = rlm.completion("first-ctx", root_prompt="Remember.")
        two = rlm.completion("second-ctx", root_prompt="Recall.")
    assert one.response == "stored 9"
    assert two.response == "swordfish first-ctx second-ctx 3 True"
    assert one.metadata["conversation_id"] == two.metadata["conversation_id"]


def test_sdk_compaction_embedded(llm):
    llm.switch.current = long_run_policy
    with RLM(
        backend(llm), max_iterations=10, compaction=True, compaction_threshold_pct=0.03
    ) as rlm:
        result = rlm.completion("c", root_prompt="Count to seven.")
    assert result.response == "7 steps, first question in history: True"
    assert any(e["kind"] == "compaction" for e in result.metadata["trajectory"])
    assert "Compaction 1: the conversation was summarized" in render(result.metadata["trajectory"])


def test_store_keeps_owners_apart_one_turn_at_a_time_and_refuses_forged_records():
    store = ConversationStore(Ledger(MemoryStore()), b"k" * 32, 60, max_bytes=1000, turn_s=60)
    first = store.begin("alice", None, "a", None)
    with pytest.raises(ConversationError) as running:
        store.begin("alice", first.conversation_id, "b", None)
    assert running.value.status == 409
    first.state = StateRef(ref="0" * 64, data="c3RhdGU=")
    record = store.end(first)
    assert record is not None and record.signature
    cid = first.conversation_id
    with pytest.raises(ConversationError) as stranger:  # another caller does not see it
        store.begin("bob", cid, "x", None)
    assert stranger.value.status == 404
    with_data = record.model_copy(update={"contexts": [ContextRef(ref=record.contexts[0].ref,
                                                                  data="a")]})  # fmt: skip
    for forged in (
        with_data,  # signed for alice, not for bob
        with_data.model_copy(update={"signature": "0" * 64}),
        with_data.model_copy(update={"state": StateRef(ref="1" * 64)}),  # another state
    ):
        with pytest.raises(ConversationError) as refused:
            store.begin("bob", cid, "x", forged)
        assert refused.value.status == 422, forged
    again = store.begin("alice", cid, "b", None)  # the owner goes on, from the ledger
    assert again.contexts == ["a", "b"] and again.base == first.state
    store.end(again)
    with pytest.raises(ConversationError) as big:
        store.begin("alice", cid, "x" * 1001, None)
    assert big.value.status == 413


def test_openapi_names_the_new_fields(planes):
    doc = httpx.get(planes.infer.url + "/openapi.json", timeout=10).json()
    fields = doc["components"]["schemas"]["InferRequest"]["properties"]
    assert {"persistent", "conversation_id", "compaction", "compaction_threshold"} <= set(fields)
    assert "conversation_id" in doc["components"]["schemas"]["InferResult"]["properties"]
    assert "409" in doc["paths"]["/infer"]["post"]["responses"]

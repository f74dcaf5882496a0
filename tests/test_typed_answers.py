"""Typed answers: an output schema the answer must match, checked by infer, with one repair turn.

Against infer and execute as real processes (the scripted model plays the root), and embedded
through the SDK with a pydantic model.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from pydantic import BaseModel

from functions.sdk import RLM
from functions.testing.scripted_model import repl, scripted_replies, set_answer, typed_answers

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "count": {"type": "integer", "minimum": 0},
    },
    "required": ["city", "count"],
    "additionalProperties": False,
}
RIGHT = {"city": "Paris", "count": 3}
WRONG = {"city": "Paris", "count": "three"}


def ask(stack, body):
    return httpx.post(stack.infer.url + "/infer", json=body, timeout=120)


def typed(stack, schema=CITY, **extra):
    body = {"query": "Which city, how often?", "context": "Paris Paris Paris Rome",
            "output_schema": schema, **extra}  # fmt: skip
    return ask(stack, body)


def test_an_answer_that_matches_is_returned_parsed(stack, llm):
    llm.switch.current = typed_answers([RIGHT])
    r = typed(stack)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "completed", body
    assert body["value"] == RIGHT and json.loads(body["answer"]) == RIGHT
    assert body["stop_code"] is None
    system = llm.root_requests()[0].messages[0]["content"]
    assert '"additionalProperties": false' in system and 'answer["content"]' in system
    assert len(llm.root_requests()) == 1


def test_a_wrong_answer_is_repaired_in_one_turn(stack, llm):
    llm.switch.current = typed_answers([WRONG, RIGHT])
    body = typed(stack, trajectory=True).json()
    assert body["status"] == "completed" and body["value"] == RIGHT, body
    roots = llm.root_requests()
    assert len(roots) == 2
    repair = roots[1].last
    assert "does not match" in repair and "/count" in repair and '"three"' in repair
    mismatch = [e for e in body["trajectory"] if e["kind"] == "schema_mismatch"]
    assert len(mismatch) == 1 and "/count" in mismatch[0]["problems"][0]
    assert body["iterations"] == 2


def test_an_answer_never_repaired_stops_with_its_own_code(stack, llm):
    llm.switch.current = typed_answers([WRONG])
    body = typed(stack).json()
    assert body["status"] == "stopped" and body["stop_code"] == "output_schema", body
    assert "/count" in body["stop_reason"] and body["value"] is None
    assert json.loads(body["answer"]) == WRONG  # the partial answer, as it was
    assert len(llm.root_requests()) == 2  # the answer and one repair turn, no more


def test_a_repair_turn_that_sets_no_answer_stops(stack, llm):
    # The stale answer in the REPL is emptied before the repair turn's first cell: a turn that
    # only prints does not re-submit the wrong answer, and a turn that sets none ends the run.
    llm.switch.current = scripted_replies([set_answer(WRONG), repl("print(answer)")])
    body = typed(stack, trajectory=True).json()
    assert body["status"] == "stopped" and body["stop_code"] == "output_schema"
    printed = [e["stdout"] for e in body["trajectory"] if e["kind"] == "cell"][-1]
    assert "'ready': False" in printed and "set no answer" in body["stop_reason"]


def test_the_value_may_come_as_json_text_or_through_final_var(stack, llm):
    llm.switch.current = scripted_replies([f"FINAL({json.dumps(RIGHT)})"])
    assert typed(stack).json()["value"] == RIGHT
    llm.switch.current = scripted_replies(
        [repl(f"found = {RIGHT!r}"), "The value is in `found`.\nFINAL_VAR(found)"]
    )
    assert typed(stack).json()["value"] == RIGHT
    fenced = f"```json\n{json.dumps(RIGHT)}\n```"
    llm.switch.current = scripted_replies([set_answer(fenced)])
    assert typed(stack).json()["value"] == RIGHT


def test_a_string_schema_takes_the_text_as_it_is(stack, llm):
    llm.switch.current = typed_answers(["42"])
    body = typed(stack, schema={"type": "string", "maxLength": 5}).json()
    assert body["value"] == "42" and body["answer"] == '"42"'
    body = typed(stack, schema={"type": "integer"}).json()
    assert body["value"] == 42


def test_unusable_schemas_are_refused_before_any_model_call(stack, llm):
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"type": "string"}')

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = {"$ref": f"http://127.0.0.1:{server.server_address[1]}/schema.json"}
        cases = [
            (remote, "Retrieval is disabled"),
            ({"$ref": "file:///etc/passwd"}, "Retrieval is disabled"),
            ({"type": "nonsense"}, "/type"),
            ({"type": "string", "pattern": "^(?=a)a$"}, "/pattern"),  # no look-arounds
            ([{"type": "string"}], "output_schema: Input should be a valid dictionary"),
            ({"type": "object", "description": "x" * 70_000}, "the limit is 65536"),
        ]
        for schema, expected in cases:
            r = typed(stack, schema=schema)
            assert r.status_code == 422, (schema, r.text)
            assert expected in r.json()["error"] and "Traceback" not in r.text
        assert hits == [] and llm.requests == []
    finally:
        server.shutdown()
        server.server_close()


def test_a_backtracking_pattern_cannot_stall_infer(stack, llm):
    # Python's re would take ages on this pattern with this answer, holding the interpreter.
    llm.switch.current = typed_answers(["a" * 5000 + "!"])
    started = time.monotonic()
    body = typed(stack, schema={"type": "string", "pattern": "^(a|a)*$"}).json()
    assert body["stop_code"] == "output_schema"
    assert time.monotonic() - started < 30
    assert httpx.get(stack.infer.url + "/health", timeout=5).status_code == 200


def test_a_value_too_deep_to_check_is_a_mismatch(stack, llm):
    deep = "[" * 100_000 + "]" * 100_000
    llm.switch.current = scripted_replies([f"FINAL({deep})"])
    body = typed(stack, schema={"type": "array", "items": {"type": "array"}}).json()
    assert body["status"] == "stopped" and body["stop_code"] == "output_schema", body


class City(BaseModel):
    city: str
    count: int


def backend(model) -> dict[str, str]:
    return {"base_url": model.base_url, "api_key": "k", "model_name": "scripted-root"}


def test_sdk_returns_the_pydantic_model(llm):
    llm.switch.current = typed_answers([WRONG, RIGHT])
    with RLM(backend(llm)) as rlm:
        result = rlm.completion("Paris Paris Paris", root_prompt="Which city?", output_schema=City)
    assert result.value == City(city="Paris", count=3) and result.status == "completed"
    assert "City" in llm.root_requests()[0].messages[0]["content"]  # pydantic's schema title
    with RLM(backend(llm)) as rlm:
        result = rlm.completion("Paris", root_prompt="Which city?", output_schema=CITY)
    assert result.value == RIGHT


def test_repair_turns_are_a_setting(llm, monkeypatch):
    monkeypatch.setenv("INFER_SCHEMA_REPAIRS", "0")
    llm.switch.current = typed_answers([WRONG, RIGHT])
    with RLM(backend(llm)) as rlm:
        result = rlm.completion("Paris", root_prompt="Which city?", output_schema=City)
    assert result.metadata["stop_code"] == "output_schema" and result.value is None
    assert len(llm.root_requests()) == 1


def test_sdk_refuses_a_schema_that_is_neither_a_model_nor_a_dict(llm):
    with RLM(backend(llm)) as rlm, pytest.raises(TypeError, match="pydantic model"):
        rlm.completion("x", root_prompt="q", output_schema=int)

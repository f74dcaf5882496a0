"""Request decoding on hostile input: each decoder returns a value or raises its own clean error.

CloudEvents (binary and structured), state and context refs, and the JSON request models of
both planes. The model-output parsing (code blocks, FINAL, FINAL_VAR) is fuzzed in
test_parsing.py.
"""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from functions import events
from functions.contract import (
    ContextRef,
    ExecuteRequest,
    ExecuteResponse,
    InferRequest,
    StateRef,
    SubcallRequest,
    context_ref,
    has_lone_surrogate,
    sha256_hex,
)
from functions.errors import BadCell, RLMError
from functions.execute.cells import CellFailed, take_report, unpack_state
from functions.execute.sandbox import TurnResult
from functions.http import parse_json, validate
from functions.infer.chat import ChatRequest

FUZZ = settings(max_examples=100, deadline=None)

# JSON values, text that is almost JSON, and bytes that are not text at all.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
surrogates = st.integers(0xD800, 0xDFFF).map(lambda c: f'"\\u{c:04x}"'.encode())
bodies = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
    st.sampled_from([b"", b"{", b"[" * 5000, b'{"a": 1}x', b"\xff\xfe", b"null", b"NaN"]),
    surrogates,
)

# ----------------------------------------------------------------------------- CloudEvents

ATTRIBUTES = ("specversion", "id", "source", "type", "datacontenttype", "subject", "time")
attribute_values = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["1.0", "0.3", "0.1", "9.9", "", events.EXECUTE_REQUESTED]),
)
content_types = st.sampled_from(
    ["application/json", "application/cloudevents+json", "text/plain", "", "application/x"]
)


@FUZZ
@given(
    ce=st.dictionaries(st.sampled_from(ATTRIBUTES), attribute_values, max_size=len(ATTRIBUTES)),
    content_type=content_types,
    body=bodies,
)
def test_binary_events_parse_or_fail_cleanly(ce, content_type, body) -> None:
    headers = {f"ce-{k}": v for k, v in ce.items()} | {"content-type": content_type}
    _parse_or_bad_event(headers, body)


@FUZZ
@given(
    envelope=st.dictionaries(
        st.sampled_from((*ATTRIBUTES, "data", "data_base64")),
        attribute_values | json_values,
        max_size=len(ATTRIBUTES) + 2,
    ),
    mangle=st.sampled_from(["json", "bytes", "list"]),
    junk=st.binary(max_size=32),
)
def test_structured_events_parse_or_fail_cleanly(envelope, mangle, junk) -> None:
    body = {"json": json.dumps(envelope).encode(), "bytes": junk, "list": b"[1, 2]"}[mangle]
    _parse_or_bad_event({"content-type": events.STRUCTURED_CONTENT_TYPE}, body)


def _parse_or_bad_event(headers: dict[str, str], body: bytes) -> None:
    try:
        event = events.parse(headers, body, events.EXECUTE_REQUESTED)
    except events.BadEvent as e:
        assert str(e)  # a message, which the handler sends back as a 400
        return
    assert event["type"] == events.EXECUTE_REQUESTED
    assert event.data is not None and not isinstance(event.data, bytes)


@pytest.mark.parametrize(
    ("attributes", "words"),
    [
        ({"specversion": "0.1"}, "specversion 1.0"),
        ({"specversion": "9.9"}, "specversion 1.0"),
        ({"id": None}, "ce-id"),
        ({"source": None}, "ce-source"),
        ({"type": None}, "ce-type"),
        ({"type": "com.example.other"}, "not handled here"),
    ],
)
def test_bad_event_messages_say_what_to_send(attributes, words) -> None:
    ce = {"specversion": "1.0", "id": "1", "source": "/t", "type": events.EXECUTE_REQUESTED}
    ce.update(attributes)
    headers = {f"ce-{k}": v for k, v in ce.items() if v is not None}
    with pytest.raises(events.BadEvent, match=words):
        events.parse(
            headers | {"content-type": "application/json"}, b"{}", events.EXECUTE_REQUESTED
        )


@pytest.mark.parametrize("data", [b"", b"\xff", b"{nope", b'{"code": "\\udc80"}'])
def test_unreadable_event_data_is_a_bad_event(data) -> None:
    headers = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/t",
               "ce-type": events.EXECUTE_REQUESTED, "content-type": "application/json"}  # fmt: skip
    with pytest.raises(events.BadEvent):
        events.parse(headers, data, events.EXECUTE_REQUESTED)


# ----------------------------------------------------------------------------- refs

sha = st.text("0123456789abcdef", min_size=64, max_size=64)
packed = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
    st.binary(max_size=40).map(lambda b: base64.b64encode(zlib.compress(b)).decode()),
    st.binary(max_size=40).map(lambda b: base64.b64encode(zlib.compress(b)[:-3]).decode()),
    st.just(base64.b64encode(zlib.compress(b"\0" * 100_000)).decode()),  # a small zip bomb
)


@FUZZ
@given(data=packed, right_ref=st.booleans())
def test_state_data_unpacks_or_is_refused(data, right_ref) -> None:
    try:
        expected = zlib.decompress(base64.b64decode(data, validate=True))
    except (ValueError, zlib.error):
        expected = None
    ref = sha256_hex(expected) if expected is not None and right_ref else "0" * 64
    try:
        blob = unpack_state(data, 50_000, ref)
    except BadCell as e:
        assert "state.data" in str(e)
        return
    assert blob == expected and len(blob) <= 50_000


@FUZZ
@given(ref=st.text(max_size=70) | sha, data=packed | st.none(), key=st.sampled_from(["ref", "x"]))
def test_state_refs_validate_or_name_the_field(ref, data, key) -> None:
    _model_or_problem(StateRef, {key: ref, "data": data})


@FUZZ
@given(ref=st.text(max_size=70) | sha, data=json_values)
def test_context_refs_validate_or_name_the_field(ref, data) -> None:
    ctx = _model_or_problem(ContextRef, {"ref": ref, "data": data})
    if ctx is not None:
        assert context_ref(ctx.data)  # any JSON value has a ref


# ----------------------------------------------------------------------------- request models

MODELS = [ExecuteRequest, InferRequest, SubcallRequest, ChatRequest]
field_names = st.sampled_from(
    ["code", "context", "timeout", "session_id", "state", "rlm_context", "limits", "callback",
     "return_state", "query", "context_uri", "max_depth", "max_iterations", "max_budget_usd",
     "kind", "prompts", "model", "messages", "stream", "tiemout"]
)  # fmt: skip
request_bodies = st.one_of(
    bodies,
    st.dictionaries(field_names, json_values, max_size=6).map(lambda d: json.dumps(d).encode()),
)


@FUZZ
@given(model=st.sampled_from(MODELS), body=request_bodies)
def test_request_bodies_decode_or_get_a_4xx(model, body) -> None:
    try:
        value = parse_json(body)
    except RLMError as problem:
        assert problem.status == 400 and problem.message
        return
    assert not has_lone_surrogate(body, value)
    _model_or_problem(model, value)


def _model_or_problem(model: Any, value: Any) -> Any:
    try:
        return validate(model, value)
    except RLMError as problem:
        assert problem.status == 422 and problem.message
        return None


def test_lone_surrogates_are_refused_and_pairs_kept() -> None:
    with pytest.raises(RLMError, match="without its pair") as e:
        parse_json(b'{"code": "print(1)", "context": {"s": "\\ud800"}}')
    assert e.value.status == 400
    assert parse_json(b'{"s": "\\ud83d\\ude00"}') == {"s": "\U0001f600"}
    assert parse_json(b'{"s": "\\\\ud800"}') == {"s": "\\ud800"}  # an escaped backslash


# ----------------------------------------------------------------------------- the guest's report

report_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
report_keys = st.sampled_from(
    ["error", "answer", "locals", "state_inline", "state_error", "load_failed", "other"]
)


@FUZZ
@given(meta=st.dictionaries(report_keys, report_values, max_size=5) | report_values)
def test_a_report_is_taken_or_the_cell_failed(meta) -> None:
    """Whatever the guest writes after the marker, the host takes a report or fails the cell."""
    result = TurnResult(b"", b"", json.dumps(meta).encode(), None, ())
    try:
        taken = take_report(result, ExecuteResponse())
    except CellFailed:
        return
    assert isinstance(taken, dict) and taken

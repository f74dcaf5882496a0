"""CloudEvent types and the request/reply plumbing both functions share.

One reverse-DNS prefix, defined here, names every event the system accepts or emits.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent, from_http

from functions.contract import has_lone_surrogate
from functions.errors import BadRequest
from functions.http import LONE_SURROGATE

PREFIX = "dev.rlm"
SOURCE_INFER = "/rlm/infer"
SOURCE_EXECUTE = "/rlm/execute"

INFER_REQUESTED = f"{PREFIX}.infer.requested"
INFER_COMPLETED = f"{PREFIX}.infer.completed"
INFER_FAILED = f"{PREFIX}.infer.failed"
INFER_PROGRESS = f"{PREFIX}.infer.progress"
EXECUTE_REQUESTED = f"{PREFIX}.execute.requested"
EXECUTE_COMPLETED = f"{PREFIX}.execute.completed"
EXECUTE_FAILED = f"{PREFIX}.execute.failed"

ACCEPTED = (INFER_REQUESTED, EXECUTE_REQUESTED)
EMITTED = (
    INFER_COMPLETED,
    INFER_FAILED,
    INFER_PROGRESS,
    EXECUTE_COMPLETED,
    EXECUTE_FAILED,
)

STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"


class BadEvent(BadRequest):
    """A request that claims to be a CloudEvent but is not a valid one."""


def is_cloudevent(headers: Mapping[str, str]) -> bool:
    """Binary mode carries ce-* headers; structured mode a cloudevents content type."""
    lowered = {str(k).lower(): v for k, v in dict(headers).items()}
    content_type = lowered.get("content-type", "") or ""
    return "ce-specversion" in lowered or content_type.startswith(STRUCTURED_CONTENT_TYPE)


REQUIRED = ("specversion", "id", "source", "type")
_HOW = (
    "send specversion 1.0, id, source and type as ce-* headers (binary mode) "
    f"or in an {STRUCTURED_CONTENT_TYPE} body (structured mode)"
)


def parse(headers: Mapping[str, str], body: bytes, expected_type: str) -> CloudEvent:
    """Decode a binary- or structured-mode event, check its type, and decode JSON data."""
    lowered = {str(k).lower(): v for k, v in dict(headers).items()}
    if "ce-specversion" in lowered:  # the SDK calls any missing header a missing specversion
        missing = [f"ce-{name}" for name in REQUIRED if not lowered.get(f"ce-{name}")]
        if missing:
            raise BadEvent(f"binary-mode CloudEvent without {', '.join(missing)}: {_HOW}")
    try:
        event = from_http(dict(headers), body)
    except Exception as e:  # the SDK raises several unrelated types for malformed events
        raise BadEvent(f"not a valid CloudEvent ({e}): {_HOW}") from None
    if event["type"] != expected_type:
        raise BadEvent(f"event type {event['type']!r} is not handled here; send {expected_type!r}")
    if event.data is None:
        raise BadEvent("the event has no data: send the request's JSON object as its data")
    if isinstance(event.data, bytes | bytearray):  # binary mode, data the SDK could not decode
        try:
            event.data = json.loads(bytes(event.data).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise BadEvent(f"the event's data is not UTF-8 JSON ({e}): send an object") from None
    if has_lone_surrogate(body, event.data):
        raise BadEvent(f"the event {LONE_SURROGATE}")
    return event


def reply(
    event_type: str, source: str, data: Any, subject: str | None = None
) -> tuple[dict[str, str], bytes]:
    """A binary-mode reply event: its headers and body, for an HTTP response."""
    attributes = {
        "type": event_type,
        "source": source,
        "id": str(uuid.uuid4()),
        "datacontenttype": "application/json",
    }
    if subject:
        attributes["subject"] = subject
    headers, body = to_binary(CloudEvent(attributes, data))
    return dict(headers), body

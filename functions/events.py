"""CloudEvent types and the request/reply plumbing both functions share.

One reverse-DNS prefix, defined here, names every event the system accepts or emits.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent, from_http

from functions.contract import has_lone_surrogate
from functions.errors import BadRequest
from functions.http import LONE_SURROGATE, BadNumber, loads_json

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
# What an event's id, source and type may be: kept (infer remembers answered events by source and
# id) and sent back (the reply's subject is the id), so bounded and free of anything a header or
# a log line could take for something else. Part of the contract, like the models' field caps.
ATTRIBUTE_CHARS = {"id": 256, "source": 1024, "type": 256}
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")
_SDK_ERROR_CHARS = 200  # the SDK's messages may quote the body: only their start is shown


def parse(headers: Mapping[str, str], body: bytes, expected_type: str) -> CloudEvent:
    """Decode a binary- or structured-mode event, check its attributes and type, and decode its
    JSON data with the same rules as a plain request's body."""
    lowered = {str(k).lower(): v for k, v in dict(headers).items()}
    binary = "ce-specversion" in lowered
    if binary:  # the SDK calls any missing header a missing specversion
        missing = [f"ce-{name}" for name in REQUIRED if not lowered.get(f"ce-{name}")]
        if missing:
            raise BadEvent(f"binary-mode CloudEvent without {', '.join(missing)}: {_HOW}")
        _check_attributes({name: lowered[f"ce-{name}"] for name in ATTRIBUTE_CHARS})
    else:
        envelope = _json(body, "body")
        if isinstance(envelope, dict):
            _check_attributes(envelope)
    try:
        event = from_http(dict(headers), body, data_unmarshaller=lambda raw: raw)
    except Exception as e:  # the SDK raises several unrelated types for malformed events
        reason = str(e)[:_SDK_ERROR_CHARS]
        raise BadEvent(f"not a valid CloudEvent ({reason}): {_HOW}") from None
    if event["type"] != expected_type:
        raise BadEvent(f"event type {event['type']!r} is not handled here; send {expected_type!r}")
    if isinstance(event.data, bytes | bytearray | str):  # binary mode: the body, undecoded
        event.data = _json(event.data, "data")
    if event.data is None:  # none sent, or JSON null
        raise BadEvent("the event has no data: send the request's JSON object as its data")
    if has_lone_surrogate(body, event.data):
        raise BadEvent(f"the event {LONE_SURROGATE}")
    return event


def _check_attributes(attributes: Mapping[str, Any]) -> None:
    for name, cap in ATTRIBUTE_CHARS.items():
        value = attributes.get(name)
        if value is None:
            continue  # missing: the SDK names it
        if not isinstance(value, str) or len(value) > cap or not _VISIBLE_ASCII.fullmatch(value):
            raise BadEvent(
                f"the event's {name} must be 1 to {cap} printable ASCII characters, no spaces"
            )


def _json(raw: bytes | bytearray | str, what: str) -> Any:
    try:
        text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8")
        return loads_json(text)
    except BadNumber as e:
        raise BadEvent(f"the event's {what} {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = str(e)[:_SDK_ERROR_CHARS]
        raise BadEvent(f"the event's {what} is not UTF-8 JSON ({reason}): send an object") from None


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

"""HTTP plumbing both functions share: bounded JSON bodies, problems as 4xx, health, metrics."""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
from flask import Request, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError

from functions.contract import has_lone_surrogate
from functions.errors import BadRequest, NotFound, PayloadTooLarge, RLMError, Unprocessable

M = TypeVar("M", bound=BaseModel)

HEALTH_PATHS = ("/health", "/health/liveness", "/health/readiness")


def answer(route: Callable[[Request], Response], request: Request, log: logging.Logger) -> Response:
    """Run a function's router: problems become their 4xx/5xx, a bug a 500 with no traceback."""
    try:
        response = route(request)
    except RLMError as problem:
        response = problem_response(problem)
    except Exception:
        log.exception("internal error")
        response = problem_response(RLMError(f"internal error in {log.name}; see its logs"))
    if response.status_code >= 400 or request.method != "POST":
        _unbuffered(response)
    return response


def _unbuffered(response: Response) -> None:
    """Answer without reading the rest of the request body first.

    functions-framework reads every request body into memory before it sends a response that is
    not streamed (an after-request hook). A refused body (413, or a 401/404 before any reading)
    may be gigabytes, or only announced: sent as a stream, the answer goes out at once and the
    server drops the unread body as it arrives, a chunk at a time.
    """
    if not response.is_streamed:
        response.response = iter([response.get_data()])
        response.headers.pop("Content-Length", None)


def problem_response(problem: RLMError) -> Response:
    return json_response(problem.problem(), problem.status, problem.headers)


def json_response(
    body: BaseModel | dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    text = body.model_dump_json() if isinstance(body, BaseModel) else json.dumps(body)
    return Response(text, status=status, headers=headers, mimetype="application/json")


def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused with 413 past `max_bytes` before it is all read."""
    length = request.content_length
    if length is not None and length > max_bytes:
        raise PayloadTooLarge(f"request body is {length} bytes; the limit is {max_bytes}")
    data = request.stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"request body is over the limit of {max_bytes} bytes")
    return data


def parse_json(data: bytes) -> Any:
    if not data:
        raise BadRequest("request body is empty: send a JSON object")
    try:
        value = loads_json(data.decode("utf-8"))
        lone_surrogate = has_lone_surrogate(data, value)
    except UnicodeDecodeError as e:
        raise BadRequest(f"request body is not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise BadRequest(
            f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except BadNumber as e:
        raise BadRequest(f"request body {e}") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    if lone_surrogate:
        raise BadRequest(f"request body {LONE_SURROGATE}")
    return value


class BadNumber(ValueError):
    """A JSON number no field can mean: NaN, an infinity, or an integer past Python's digits."""


def loads_json(text: str | bytes) -> Any:
    """`json.loads` that refuses NaN, Infinity, floats that overflow to them and integers of
    more digits than Python converts (`BadNumber`), instead of taking them or failing later."""
    try:
        return json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except ValueError as e:
        if isinstance(e, json.JSONDecodeError | BadNumber) or "digits" not in str(e):
            raise
        raise BadNumber(f"has an integer of more than {sys.get_int_max_str_digits()} digits: "
                        "send it as a string") from None  # fmt: skip


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadNumber("has a number too large for a float: send a finite one")
    return value


def _no_constant(name: str) -> float:
    raise BadNumber(f"has {name}, which JSON does not allow: send a finite number or null")


LONE_SURROGATE = "has a \\ud800-\\udfff escape without its pair: send valid Unicode text"


def validate(model: type[M], value: Any) -> M:
    """Build the model, or a 422 naming every field that is wrong and why."""
    if not isinstance(value, dict):
        raise Unprocessable(f"expected a JSON object, got {type(value).__name__}")
    try:
        return model.model_validate(value, strict=True)  # JSON types as documented: no coercion
    except ValidationError as e:
        problems = [_describe(err) for err in e.errors()]
        raise Unprocessable("; ".join(problems[:5]), detail=problems) from None
    except RecursionError:
        raise Unprocessable("request body is nested too deeply") from None


def _describe(err: Any) -> str:
    where = ".".join(str(p) for p in err.get("loc", ())) or "body"
    if err.get("type") == "extra_forbidden":
        return f"{where}: unknown field (check its spelling)"
    if err.get("type") == "missing":
        return f"{where}: required field is missing"
    return f"{where}: {err.get('msg', 'invalid')}"


def metrics_response(registry: CollectorRegistry, refresh: Callable[[], None] | None) -> Response:
    if refresh:
        refresh()
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


def not_found(request: Request, routes: str) -> NotFound:
    return NotFound(f"no route {request.method} {request.path}; this function serves {routes}")


def json_errors(routes: str) -> None:
    """Flask answers a URL no rule takes (one with a newline, say) before the function runs;
    make that answer a JSON problem too. Call it at import, inside functions-framework."""
    import functions_framework

    def unrouted(error: Exception) -> Response:
        response = problem_response(NotFound(f"no such route; this function serves {routes}"))
        _unbuffered(response)
        return response

    functions_framework.errorhandler(404)(unrouted)


# gunicorn closes a keep-alive connection after 2 s idle; a client that reuses one just then
# sees "Server disconnected" with no way to know whether the request was served. Ours let idle
# connections go first.
IDLE_CONNECTION_S = 1.0


def client(timeout: httpx.Timeout | float, **options: Any) -> httpx.Client:
    """An httpx client for calls between the planes and to callers' endpoints."""
    limits = httpx.Limits(keepalive_expiry=IDLE_CONNECTION_S)
    return httpx.Client(timeout=timeout, limits=limits, **options)

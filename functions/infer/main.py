"""The infer function: runs Recursive Language Models; the public entry point.

    functions-framework --source functions/infer/main.py --target infer

Routes: POST /infer and POST / (JSON, `Accept: text/event-stream` for progress, or a
CloudEvent `<prefix>.infer.requested`), POST /subcalls (the sandbox's callbacks),
POST /v1/chat/completions (OpenAI-compatible), POST /mcp (MCP, streamable HTTP), GET /health*,
GET /metrics, GET /openapi.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import select
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import functions_framework
from flask import Request, Response

from functions import events, logs
from functions.config import ConfigError
from functions.contract import CancelReply, InferRequest, InferResult
from functions.errors import BadRequest, Conflict, PayloadTooLarge, RLMError
from functions.http import (
    HEALTH_PATHS,
    answer,
    json_errors,
    json_response,
    metrics_response,
    not_found,
    parse_json,
    read_body,
    validate,
)
from functions.infer import chat, mcp_http, metrics, subcalls
from functions.infer.inputs import load_context
from functions.infer.ledger import ANONYMOUS, event_key
from functions.infer.service import InferService
from functions.infer.settings import InferSettings

log = logging.getLogger("rlm.infer")

try:
    SETTINGS = InferSettings.from_env()
except ConfigError as e:
    sys.exit(f"infer: configuration error: {e}")
logs.setup()

_service: InferService | None = None
_service_lock = threading.Lock()
_BODY_SLACK = 1 << 20
_HEARTBEAT_S = 0.5


def service() -> InferService:
    """Built on first use, in the worker process (clients and threads do not survive fork)."""
    global _service
    with _service_lock:
        if _service is None:
            from functions.infer.wiring import build_service

            bound = SETTINGS.run_bound()
            if bound < SETTINGS.max_runs:
                log.warning(
                    "INFER_MAX_RUNS=%d lowered to %d: THREADS=%d leaves room for that many runs "
                    "and their sub-call callbacks", SETTINGS.max_runs, bound, SETTINGS.threads,
                )  # fmt: skip
            _service = build_service(dataclasses.replace(SETTINGS, max_runs=bound))
            if SETTINGS.sink_url:
                from functions.infer.sink import ProgressSink

                _service.sink = ProgressSink(SETTINGS.sink_url)
        return _service


ROUTES = (
    "POST /infer, POST /infer/{run_id}/cancel, POST /v1/chat/completions, POST /mcp, GET /health"
)
json_errors(ROUTES)


@functions_framework.http
def infer(request: Request) -> Response:
    return answer(_route, request, log)


def _route(request: Request) -> Response:
    path = request.path.rstrip("/") or "/"
    method = request.method
    if method == "GET" and path in HEALTH_PATHS:
        return json_response({"status": "ok"})
    if method == "GET" and path == "/metrics":
        return metrics_response(metrics.REGISTRY, None)
    if method == "GET" and path == "/openapi.json":
        from functions.infer.openapi import document

        return json_response(document())
    if method == "POST" and path == "/subcalls":
        read = lambda n: read_body(request, n)  # noqa: E731
        return json_response(subcalls.serve(service(), request.headers.get("authorization"), read))
    if method == "POST" and path.startswith("/infer/") and path.endswith("/cancel"):
        run_id = path[len("/infer/") : -len("/cancel")]
        token = request.headers.get(CANCEL_TOKEN_HEADER)
        service().cancel(run_id, _caller(request), token)
        return json_response(CancelReply(run_id=run_id), 202)
    if path == "/mcp":
        return _mcp(request)
    if method == "POST" and path == "/v1/chat/completions":
        try:
            return _chat(request)
        except RLMError as problem:  # in OpenAI's shape, so its clients show the message
            return json_response(chat.problem_body(problem), problem.status, problem.headers)
    if method == "POST" and path in ("/", "/infer"):
        if events.is_cloudevent(request.headers):
            return _serve_event(request)
        infer_request = validate(InferRequest, parse_json(_body(request)))
        traceparent = request.headers.get("traceparent")
        if "text/event-stream" in request.headers.get("accept", ""):
            return _stream(infer_request, traceparent, _caller(request))
        run_id = infer_request.run_id or uuid.uuid4().hex[:16]
        caller = _caller(request)
        with _cancelled_on_hang_up(request, run_id, caller):
            result = _run(
                infer_request.model_copy(update={"run_id": run_id}), traceparent,
                caller=caller, cancel_token=_chosen_cancel_token(request),
            )  # fmt: skip
        return json_response(result, 502 if result.status == "failed" else 200)
    raise not_found(request, ROUTES)


@contextmanager
def _cancelled_on_hang_up(request: Request, run_id: str, caller: str) -> Iterator[None]:
    """A client that closes its connection while its run goes on cancels the run."""
    stop_watching = _watch_hang_up(request, lambda: service().stop(run_id, caller))
    try:
        yield
    finally:
        stop_watching()


def _watch_hang_up(request: Request, hung_up: Callable[[], None]) -> Callable[[], None]:
    """Call `hung_up` once if the client closes its connection; returns what stops watching.
    gunicorn hands the connection's socket to the app; it is looked at, never read, every
    `_HEARTBEAT_S`."""
    connection = request.environ.get("gunicorn.socket")
    done = threading.Event()

    def watch() -> None:
        while not done.wait(_HEARTBEAT_S):
            if _hung_up(connection):
                hung_up()
                return

    if connection is not None:
        threading.Thread(target=watch, daemon=True).start()
    return done.set


def _hung_up(connection: socket.socket) -> bool:
    """The peer closed (end of stream or reset); a pipelined next request is not a hang-up."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except (TimeoutError, InterruptedError, ValueError):  # a TLS socket cannot be peeked at
        return False
    except OSError:  # reset by the peer
        return True


def _body(request: Request) -> bytes:
    return read_body(request, SETTINGS.max_context_bytes + _BODY_SLACK)


def _run(
    request: InferRequest,
    traceparent: str | None,
    emit: Any = None,
    cancelled: Any = None,
    caller: str = ANONYMOUS,
    on_start: Any = None,
    cancel_token: str | None = None,
) -> InferResult:
    context = load_context(
        request.context,
        request.context_uri,
        SETTINGS.max_context_bytes,
        SETTINGS.context_url_prefixes,
    )
    svc = service()
    sink = svc.sink

    def fan_out(kind: str, data: dict[str, Any]) -> None:
        metrics.observe_event(kind, data)
        if emit:
            emit(kind, data)
        if sink:
            sink.emit(kind, data)

    started = time.monotonic()
    result = svc.run(
        request, context, fan_out, traceparent, cancelled,
        caller=caller, on_start=on_start, cancel_token=cancel_token,
    )  # fmt: skip
    metrics.requests_total.labels(status=result.status).inc()
    metrics.duration.observe(time.monotonic() - started)
    for usage in result.usage.values():
        metrics.tokens_total.labels(direction="input").inc(usage.input_tokens)
        metrics.tokens_total.labels(direction="output").inc(usage.output_tokens)
    log.info(
        "run %s",
        result.status,
        extra={"run_id": result.run_id, "depth": 0, "status": result.status,
               "duration_s": result.execution_time},
    )  # fmt: skip
    return result


def _stream(request: InferRequest, traceparent: str | None, caller: str) -> Response:
    """Server-sent events: the run id (and its cancel token) first, progress as the run goes,
    then the result."""

    def frames() -> Iterator[str]:
        for kind, data in _updates(request, traceparent, caller):
            if kind == "idle":
                yield ": keep-alive\n\n"
                continue
            if kind == "result":
                data = data.model_dump(mode="json")
            elif kind == "error":
                data = {"error": data.message, "status": data.status}
            yield f"event: {kind}\ndata: {json.dumps(data, default=str)}\n\n"

    return Response(frames(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})


def _chat(request: Request) -> Response:
    """The OpenAI-compatible facade (see chat.py); a client that hangs up cancels its run."""
    body = validate(chat.ChatRequest, parse_json(_body(request)))
    caller, traceparent = _caller(request), request.headers.get("traceparent")
    infer_request = chat.to_infer_request(body)
    run_id = uuid.uuid4().hex[:16]
    infer_request = infer_request.model_copy(update={"run_id": run_id})
    service().config_for(infer_request)  # a request it cannot run is a 4xx, before any stream
    if body.stream:
        frames = chat.stream(body, run_id, _updates(infer_request, traceparent, caller))
        return Response(frames, mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})
    with _cancelled_on_hang_up(request, run_id, caller):
        result = _run(infer_request, traceparent, caller=caller)
    return json_response(chat.completion(body, result))


def _mcp(request: Request) -> Response:
    """The MCP tools over streamable HTTP (see mcp_server, mcp_http): runs are the caller's,
    as on /infer, and a client that hangs up stops its run."""
    caller = _caller(request)
    limit = SETTINGS.max_context_bytes + _BODY_SLACK
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(
            f"request body is {request.content_length} bytes; the limit is {limit}"
        )
    hung_up = threading.Event()
    environ = {**request.environ, mcp_http.CALLER: caller, mcp_http.HUNG_UP: hung_up.is_set}
    stop_watching = _watch_hang_up(request, hung_up.set)
    try:
        response = Response.from_app(_mcp_app(), environ)
    except BaseException:
        stop_watching()
        raise
    response.call_on_close(stop_watching)
    return response


_mcp_served: Any = None


def _mcp_app() -> Any:
    """Built on first use, in the worker process, like the service."""
    global _mcp_served
    with _service_lock:
        if _mcp_served is None:
            from functions.infer.mcp_server import Surface, build_server

            def run(request: InferRequest, emit: Any, cancelled: Any, caller: str) -> InferResult:
                return _run(request, None, emit, cancelled, caller)

            settings = dataclasses.replace(SETTINGS, max_runs=SETTINGS.run_bound())
            surface = Surface(run=run, stop=lambda run_id, caller: service().stop(run_id, caller),
                              settings=settings, who=mcp_http.who)  # fmt: skip
            _mcp_served = mcp_http.McpApp(
                build_server(surface), SETTINGS.max_context_bytes + _BODY_SLACK
            )
        return _mcp_served


def _updates(
    request: InferRequest, traceparent: str | None, caller: str
) -> Iterator[tuple[str, Any]]:
    """A run on a thread of its own, as it goes: ("run", {run_id, cancel_token}) once the ledger
    has it, each progress event, ("idle", None) every `_HEARTBEAT_S` without one, then
    ("result", InferResult) or ("error", RLMError).

    Closing the iterator before the end stops the run: a server sends what it yields, so a
    client that went away is found out by the next idle beat at the latest.
    """
    run_id = request.run_id or uuid.uuid4().hex[:16]
    request = request.model_copy(update={"run_id": run_id})
    updates: queue.Queue[tuple[str, Any]] = queue.Queue()
    gone = threading.Event()

    def started(run_id: str, cancel_token: str) -> None:
        updates.put(("run", {"run_id": run_id, "cancel_token": cancel_token}))

    def work() -> None:
        try:
            result = _run(request, traceparent, lambda k, d: updates.put((k, d)), gone.is_set,
                          caller, started)  # fmt: skip
            updates.put(("result", result))
        except RLMError as problem:
            updates.put(("error", problem))
        except Exception:  # a bug: the stream ends with a 500's message, not in silence
            log.exception("internal error")
            updates.put(("error", RLMError("internal error in rlm.infer; see its logs")))

    threading.Thread(target=work, daemon=True).start()
    try:
        while True:
            try:
                kind, data = updates.get(timeout=_HEARTBEAT_S)
            except queue.Empty:
                yield "idle", None
                continue
            yield kind, data
            if kind in ("result", "error"):
                return
    finally:
        gone.set()  # the client went away, or the run ended
        service().stop(run_id, caller)


def _serve_event(request: Request) -> Response:
    """A CloudEvent asking for a run. Its redelivery, to any pod, gets the first answer without
    a second run; while the first delivery's run is alive, a redelivery is asked to come back
    later (409); a run whose pod died is resumed from its last checkpoint."""
    body = _body(request)
    event = events.parse(dict(request.headers), body, events.INFER_REQUESTED)
    ledger = service().ledger
    key = event_key(str(event["source"]), str(event["id"]), event.data)
    state, answered = ledger.claim_event(key, SETTINGS.event_ttl_s)
    if state == "answered":
        log.info("redelivered event answered from the ledger", extra={"event_id": key[:16]})
        kind, data = answered
    else:
        try:
            kind, data = _answer_event(event, request, key)
        except Conflict:
            raise  # its first delivery still runs
        except BaseException:
            if state == "new":
                ledger.forget_event(key)  # no answer: a redelivery runs it
            raise
        ledger.answer_event(key, [kind, data], SETTINGS.event_ttl_s)
    headers, payload = events.reply(kind, events.SOURCE_INFER, data, subject=event["id"])
    return Response(payload, status=200, headers=headers)


def _answer_event(event: Any, request: Request, key: str) -> tuple[str, dict[str, Any]]:
    try:
        infer_request = validate(InferRequest, event.data)
        if infer_request.run_id is None:  # one event, one run: a redelivery may resume it
            infer_request = infer_request.model_copy(update={"run_id": f"event-{key[:32]}"})
        result = _run(infer_request, request.headers.get("traceparent"), caller=_caller(request))
    except RLMError as problem:
        if problem.status in (409, 429, 503):
            raise  # the broker redelivers later
        return events.INFER_FAILED, {"error": problem.message, "status": problem.status}
    kind = events.INFER_FAILED if result.status == "failed" else events.INFER_COMPLETED
    return kind, result.model_dump(mode="json")


CANCEL_TOKEN_HEADER = "x-rlm-cancel-token"


def _chosen_cancel_token(request: Request) -> str | None:
    """A secret the caller chose to cancel its run with (in local mode, where every caller is
    the same owner); at least 16 characters."""
    token = request.headers.get(CANCEL_TOKEN_HEADER)
    if token is None:
        return None
    if not 16 <= len(token) <= 200:
        raise BadRequest(f"{CANCEL_TOKEN_HEADER} must be 16 to 200 characters of secret")
    return token


def _caller(request: Request) -> str:
    """Who is asking: the owner of the runs this request starts or reaches."""
    return ANONYMOUS

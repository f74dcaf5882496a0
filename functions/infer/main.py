"""The infer function: runs Recursive Language Models; the public entry point.

    functions-framework --source functions/infer/main.py --target infer

Routes: POST /infer and POST / (JSON, `Accept: text/event-stream` for progress, or a
CloudEvent `<prefix>.infer.requested`), POST /subcalls (the sandbox's callbacks),
POST /v1/chat/completions (OpenAI-compatible), GET /health*, GET /metrics, GET /openapi.json.
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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import functions_framework
from flask import Request, Response

from functions import events, logs
from functions.config import ConfigError
from functions.contract import CancelReply, InferRequest, InferResult
from functions.errors import BadRequest, Conflict, RLMError
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
from functions.infer import chat, metrics, subcalls
from functions.infer.inputs import load_context
from functions.infer.ledger import ANONYMOUS, event_key
from functions.infer.service import InferService
from functions.infer.settings import InferSettings
from functions.server import EdgeLimits, serve_hardened

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


ROUTES = "POST /infer, POST /infer/{run_id}/cancel, POST /v1/chat/completions, GET /health"
json_errors(ROUTES)
serve_hardened(
    EdgeLimits(
        SETTINGS.read_timeout_s, SETTINGS.max_header_bytes, SETTINGS.max_context_bytes + _BODY_SLACK
    )
)


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
    if method == "POST" and path == "/v1/chat/completions":
        body = validate(chat.ChatRequest, parse_json(_body(request)))
        return chat.respond(body, lambda r: _run(r, request.headers.get("traceparent")))
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
    """A client that closes its connection while its run goes on cancels the run. gunicorn
    hands the connection's socket to the app; it is looked at, never read, every `_HEARTBEAT_S`."""
    connection = request.environ.get("gunicorn.socket")
    done = threading.Event()

    def watch() -> None:
        while not done.wait(_HEARTBEAT_S):
            if _hung_up(connection):
                service().stop(run_id, caller)
                return

    if connection is not None:
        threading.Thread(target=watch, daemon=True).start()
    try:
        yield
    finally:
        done.set()


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
    then the result.

    A client that goes away cancels the run: a comment line every `_HEARTBEAT_S` finds out.
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
            updates.put(("result", result.model_dump(mode="json")))
        except RLMError as problem:
            updates.put(("error", {"error": problem.message, "status": problem.status}))

    threading.Thread(target=work, daemon=True).start()

    def frames() -> Iterator[str]:
        try:
            while True:
                try:
                    kind, data = updates.get(timeout=_HEARTBEAT_S)
                except queue.Empty:
                    yield ": keep-alive\n\n"
                    continue
                yield f"event: {kind}\ndata: {json.dumps(data, default=str)}\n\n"
                if kind in ("result", "error"):
                    return
        finally:
            gone.set()  # the client went away, or the run ended
            service().stop(run_id, caller)

    return Response(frames(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})


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

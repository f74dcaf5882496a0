"""The infer function: runs Recursive Language Models; the public entry point.

    functions-framework --source functions/infer/main.py --target infer

Routes: POST /infer and POST / (JSON, `Accept: text/event-stream` for progress, or a
CloudEvent `<prefix>.infer.requested`), POST /subcalls (the sandbox's callbacks),
POST /v1/chat/completions (OpenAI-compatible), GET /health*, GET /metrics, GET /openapi.json.

Every route but /health* and /subcalls (which takes the sandbox's own tokens) needs a caller's
API key (`callers.py`), unless the operator chose INFER_AUTH=none; /metrics and /openapi.json
need an operator's key, or a peer address in INFER_METRICS_CIDRS.
"""

from __future__ import annotations

import dataclasses
import ipaddress
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
from functions.errors import Forbidden, NotFound, RLMError
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
from functions.infer import callers, chat, metrics, subcalls
from functions.infer.callers import Caller, Ticket
from functions.infer.idempotency import OncePerKey
from functions.infer.inputs import load_context
from functions.infer.service import InferService
from functions.infer.settings import InferSettings

log = logging.getLogger("rlm.infer")

try:
    SETTINGS = InferSettings.from_env()
    GATE = callers.gate_for(SETTINGS.auth, SETTINGS.api_keys_json, SETTINGS.api_keys_file)
except ConfigError as e:
    sys.exit(f"infer: configuration error: {e}")
logs.setup()
if SETTINGS.auth == "none":
    log.warning(
        "INFER_AUTH=none: no API key is asked for; anyone who reaches this server may spend "
        "its model key, up to its ceilings (INFER_MAX_BUDGET_USD per run)"
    )
_METRICS_PEERS = tuple(ipaddress.ip_network(c) for c in SETTINGS.metrics_cidrs)

_service: InferService | None = None
_service_lock = threading.Lock()
_events: OncePerKey[tuple[str, dict[str, Any]]] = OncePerKey()
_BODY_SLACK = 1 << 20
_HEARTBEAT_S = 0.5
_TICKET_SLACK_S = 120.0  # a run's place among its key's runs outlives its deadline by this
EVENT_KEY_ATTRIBUTE = "rlmkey"  # a CloudEvent's extension attribute carrying the caller's key


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


@functions_framework.http
def infer(request: Request) -> Response:
    return answer(_route, request, log)


def _route(request: Request) -> Response:
    path = request.path.rstrip("/") or "/"
    method = request.method
    if method == "GET" and path in HEALTH_PATHS:
        return json_response({"status": "ok"})
    if method == "GET" and path == "/metrics":
        _internal_only(request)
        return metrics_response(metrics.REGISTRY, None)
    if method == "GET" and path == "/openapi.json":
        from functions.infer.openapi import document

        _internal_only(request)
        return json_response(document())
    if method == "POST" and path == "/subcalls":
        read = lambda n: read_body(request, n)  # noqa: E731
        return json_response(subcalls.serve(service(), request.headers.get("authorization"), read))
    if method == "POST" and path.startswith("/infer/") and path.endswith("/cancel"):
        caller = GATE.authenticate(request.headers.get("authorization"))
        run_id = path[len("/infer/") : -len("/cancel")]
        if not service().cancel(run_id, caller):
            raise NotFound(f"no run {run_id!r} of yours is in progress on this instance")
        return json_response(CancelReply(run_id=run_id), 202)
    if method == "POST" and path == "/v1/chat/completions":
        caller = GATE.authenticate(request.headers.get("authorization"))
        body = validate(chat.ChatRequest, parse_json(_body(request)))
        traceparent = request.headers.get("traceparent")
        return chat.respond(body, lambda r: _run(*_admit(r, caller), traceparent))
    if method == "POST" and path in ("/", "/infer"):
        if events.is_cloudevent(request.headers):
            return _serve_event(request)
        caller = GATE.authenticate(request.headers.get("authorization"))
        infer_request = validate(InferRequest, parse_json(_body(request)))
        admitted, ticket = _admit(infer_request, caller)
        traceparent = request.headers.get("traceparent")
        if "text/event-stream" in request.headers.get("accept", ""):
            return _stream(admitted, ticket, traceparent)
        with _cancelled_on_hang_up(request, ticket):
            result = _run(admitted, ticket, traceparent)
        return json_response(result, 502 if result.status == "failed" else 200)
    raise not_found(request, ROUTES)


def _internal_only(request: Request) -> None:
    """/metrics and /openapi.json: for a peer in INFER_METRICS_CIDRS (a scrape that reaches the
    pod's port directly; Knative's queue-proxy forwards routed requests from 127.0.0.1), else
    for an operator's key."""
    try:
        peer = ipaddress.ip_address(request.remote_addr or "")
    except ValueError:
        peer = None
    if peer is not None and any(peer in network for network in _METRICS_PEERS):
        return
    caller = GATE.authenticate(request.headers.get("authorization"))
    if not caller.operator:
        raise Forbidden(f"{request.path} is for operator keys (or peers in INFER_METRICS_CIDRS)")


def _admit(request: InferRequest, caller: Caller) -> tuple[InferRequest, Ticket]:
    """Check the request against the operator's ceilings (422) and the caller's key (403, 429)
    before anything is spent; the request as it will run, and the caller's ticket for it."""
    config = service().config_for(request)
    run_id = request.run_id or uuid.uuid4().hex[:16]
    ttl = (
        config.max_timeout_s or SETTINGS.cell_timeout_s * config.max_iterations
    ) + _TICKET_SLACK_S
    ticket = GATE.admit(
        caller, run_id, config.models, request.max_budget_usd, config.max_budget_usd, ttl
    )
    return request.model_copy(
        update={"run_id": run_id, "max_budget_usd": ticket.budget_usd}
    ), ticket


@contextmanager
def _cancelled_on_hang_up(request: Request, ticket: Ticket) -> Iterator[None]:
    """A client that closes its connection while its run goes on cancels the run. gunicorn
    hands the connection's socket to the app; it is looked at, never read, every `_HEARTBEAT_S`."""
    connection = request.environ.get("gunicorn.socket")
    done = threading.Event()

    def watch() -> None:
        while not done.wait(_HEARTBEAT_S):
            if _hung_up(connection):
                service().cancel(ticket.run_id)
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
    ticket: Ticket,
    traceparent: str | None,
    emit: Any = None,
    cancelled: Any = None,
) -> InferResult:
    """Run an admitted request; the ticket is settled with what the run spent."""
    try:
        result = _run_admitted(request, ticket.caller, traceparent, emit, cancelled)
    except RLMError:  # refused before any model call (busy, a conversation's turn, ...)
        ticket.settle(0.0)
        raise
    except BaseException:
        ticket.settle(ticket.reserved_usd)
        raise
    ticket.settle(result.total_cost_usd)
    return result


def _run_admitted(
    request: InferRequest, caller: Caller, traceparent: str | None, emit: Any, cancelled: Any
) -> InferResult:
    context = load_context(
        request.context, request.context_uri, SETTINGS.max_context_bytes, service().context_urls
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
    result = svc.run(request, context, fan_out, traceparent, cancelled, caller=caller)
    metrics.requests_total.labels(status=result.status).inc()
    metrics.duration.observe(time.monotonic() - started)
    for usage in result.usage.values():
        metrics.tokens_total.labels(direction="input").inc(usage.input_tokens)
        metrics.tokens_total.labels(direction="output").inc(usage.output_tokens)
    log.info(
        "run %s",
        result.status,
        extra={"run_id": result.run_id, "depth": 0, "status": result.status,
               "duration_s": result.execution_time, "caller": caller.name},
    )  # fmt: skip
    return result


def _stream(request: InferRequest, ticket: Ticket, traceparent: str | None) -> Response:
    """Server-sent events: the run id first, progress as the run goes, then the result.

    A client that goes away cancels the run: a comment line every `_HEARTBEAT_S` finds out.
    """
    run_id = ticket.run_id
    updates: queue.Queue[tuple[str, Any]] = queue.Queue()
    updates.put(("run", {"run_id": run_id}))
    gone = threading.Event()

    def work() -> None:
        try:
            emit = lambda k, d: updates.put((k, d))  # noqa: E731
            result = _run(request, ticket, traceparent, emit, gone.is_set)
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
            service().cancel(run_id)

    return Response(frames(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})


def _serve_event(request: Request) -> Response:
    """A CloudEvent. The caller's key is the event's `rlmkey` extension attribute (a Broker
    carries it from the producer), or else the request's Authorization header."""
    binary_key = request.headers.get(f"ce-{EVENT_KEY_ATTRIBUTE}")
    caller = _event_caller(binary_key, request) if binary_key else None  # before the body
    body = _body(request)
    event = events.parse(dict(request.headers), body, events.INFER_REQUESTED)
    if caller is None:
        key = event.get(EVENT_KEY_ATTRIBUTE)
        caller = _event_caller(key if isinstance(key, str) else None, request)

    def work() -> tuple[str, dict[str, Any]]:
        try:
            infer_request = validate(InferRequest, event.data)
            result = _run(*_admit(infer_request, caller), request.headers.get("traceparent"))
        except RLMError as problem:
            if problem.status == 429:
                raise
            return events.INFER_FAILED, {"error": problem.message, "status": problem.status}
        kind = events.INFER_FAILED if result.status == "failed" else events.INFER_COMPLETED
        return kind, result.model_dump(mode="json")

    # one caller's event id is not another's: a replay under another key runs on its own
    (kind, data), repeat = _events.run(f"{caller.name}/{event['id']}", work)
    if repeat:
        log.info("redelivered event served from memory", extra={"event_id": event["id"]})
    headers, payload = events.reply(kind, events.SOURCE_INFER, data, subject=event["id"])
    return Response(payload, status=200, headers=headers)


def _event_caller(key: str | None, request: Request) -> Caller:
    return GATE.authenticate(f"Bearer {key}" if key else request.headers.get("authorization"))

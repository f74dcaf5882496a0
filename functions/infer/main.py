"""The infer function: runs Recursive Language Models; the public entry point.

    functions-framework --source functions/infer/main.py --target infer

Routes: POST /infer and POST / (JSON, `Accept: text/event-stream` for progress, or a
CloudEvent `<prefix>.infer.requested`), POST /subcalls (the sandbox's callbacks),
POST /v1/chat/completions (OpenAI-compatible), POST /mcp (MCP, streamable HTTP), GET /health*,
GET /metrics, GET /openapi.json.

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
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Any

import functions_framework
from flask import Request, Response

from functions import events, logs
from functions.config import ConfigError
from functions.contract import CancelReply, InferRequest, InferResult
from functions.errors import BadRequest, Conflict, Forbidden, PayloadTooLarge, RLMError
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
from functions.infer import callers, chat, mcp_http, metrics, subcalls
from functions.infer.callers import Admission, Caller, Ticket
from functions.infer.inputs import load_context
from functions.infer.ledger import event_key
from functions.infer.service import InferService
from functions.infer.settings import InferSettings
from functions.server import EdgeLimits, serve_hardened

log = logging.getLogger("rlm.infer")

try:
    SETTINGS = InferSettings.from_env()
    KEYS = callers.key_ring(SETTINGS.auth, SETTINGS.api_keys_json, SETTINGS.api_keys_file)
except ConfigError as e:
    sys.exit(f"infer: configuration error: {e}")
logs.setup()
if KEYS is None:
    log.warning(
        "INFER_AUTH=none: no API key is asked for; anyone who reaches this server may spend "
        "its model key, up to its ceilings (INFER_MAX_BUDGET_USD per run)"
    )
_METRICS_PEERS = tuple(ipaddress.ip_network(c) for c in SETTINGS.metrics_cidrs)

_service: InferService | None = None
_admission: Admission | None = None
_service_lock = threading.Lock()
_BODY_SLACK = 1 << 20
_HEARTBEAT_S = 0.5
_TICKET_SLACK_S = 120.0  # a run's place among its key's runs outlives its deadline by this
EVENT_KEY_ATTRIBUTE = "rlmkey"  # a CloudEvent's extension attribute carrying the caller's key


def service() -> InferService:
    """Built on first use, in the worker process (clients and threads do not survive fork)."""
    global _service, _admission
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
            # each key's spend and runs are counted where the runs are: in the ledger's store
            _admission = Admission(callers.StoreCounters(_service.ledger.store))
        return _service


def admission() -> Admission:
    service()
    assert _admission is not None
    return _admission


ROUTES = (
    "POST /infer, POST /infer/{run_id}/cancel, POST /v1/chat/completions, POST /mcp, GET /health"
)
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
        _internal_only(request)
        return metrics_response(metrics.REGISTRY, None)
    if method == "GET" and path == "/openapi.json":
        from functions.infer.openapi import document

        _internal_only(request)
        return json_response(document(keys=KEYS is not None))
    if method == "POST" and path == "/subcalls":
        read = lambda n: read_body(request, n)  # noqa: E731
        authorization, media = request.headers.get("authorization"), request.content_type
        return json_response(subcalls.serve(service(), authorization, read, media))
    if method == "POST" and path.startswith("/infer/") and path.endswith("/cancel"):
        caller = _caller(request)
        run_id = path[len("/infer/") : -len("/cancel")]
        token = request.headers.get(CANCEL_TOKEN_HEADER)
        service().cancel(run_id, caller.name, token)
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
        caller = _caller(request)
        infer_request = validate(InferRequest, parse_json(_body(request)))
        cancel_token = _chosen_cancel_token(request)
        admitted, ticket = _admit(infer_request, caller)
        traceparent = request.headers.get("traceparent")
        if "text/event-stream" in request.headers.get("accept", ""):
            return _stream(admitted, ticket, traceparent)
        with _cancelled_on_hang_up(request, ticket.run_id, caller.name):
            result = _run(admitted, ticket, traceparent, cancel_token=cancel_token)
        return json_response(result, 502 if result.status == "failed" else 200)
    raise not_found(request, ROUTES)


def _caller(request: Request) -> Caller:
    """Who is asking (the owner of the runs this request starts or reaches): the caller whose
    API key the Authorization header carries; in local mode (INFER_AUTH=none), the operator."""
    return callers.authenticate(KEYS, request.headers.get("authorization"))


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
    if not _caller(request).operator:
        raise Forbidden(f"{request.path} is for operator keys (or peers in INFER_METRICS_CIDRS)")


def _admit(request: InferRequest, caller: Caller) -> tuple[InferRequest, Ticket]:
    """Check the request against the operator's ceilings (422) and the caller's key (403, 429)
    before anything is spent; the request as it will run, and the caller's ticket for it."""
    config = service().config_for(request)
    run_id = request.run_id or uuid.uuid4().hex[:16]
    lifetime = config.max_timeout_s or config.cell_timeout_s * (config.max_iterations + 2)
    ticket = admission().admit(
        caller, run_id, config.models, request.max_budget_usd, config.max_budget_usd,
        lifetime + _TICKET_SLACK_S,
    )  # fmt: skip
    admitted = request.model_copy(update={"run_id": run_id, "max_budget_usd": ticket.budget_usd})
    return admitted, ticket


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
    ticket: Ticket,
    traceparent: str | None,
    emit: Any = None,
    cancelled: Any = None,
    on_start: Any = None,
    cancel_token: str | None = None,
) -> InferResult:
    """Run an admitted request; its ticket is settled with what the run spent."""
    try:
        result = _run_admitted(
            request, ticket.caller, traceparent, emit, cancelled, on_start, cancel_token
        )
    except RLMError:  # refused before any model call (busy, a conversation's turn, ...)
        ticket.settle(0.0)
        raise
    except BaseException:  # what the run spent is not known: its whole reservation stays spent
        ticket.settle(ticket.reserved_usd)
        raise
    ticket.settle(result.total_cost_usd)
    return result


def _run_admitted(
    request: InferRequest,
    caller: Caller,
    traceparent: str | None,
    emit: Any,
    cancelled: Any,
    on_start: Any,
    cancel_token: str | None,
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
    result = svc.run(
        request, context, fan_out, traceparent, cancelled,
        caller=caller.name, on_start=on_start, cancel_token=cancel_token,
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
               "duration_s": result.execution_time, "caller": caller.name},
    )  # fmt: skip
    return result


def _stream(request: InferRequest, ticket: Ticket, traceparent: str | None) -> Response:
    """Server-sent events: the run id (and its cancel token) first, progress as the run goes,
    then the result."""

    def frames() -> Iterator[str]:
        updates = _updates(request, ticket, traceparent)
        try:
            next(updates)  # started: the run event comes first
            for kind, data in updates:
                if kind == "idle":
                    yield ": keep-alive\n\n"
                    continue
                if kind == "result":
                    data = data.model_dump(mode="json")
                elif kind == "error":
                    data = {"error": data.message, "status": data.status}
                yield f"event: {kind}\ndata: {json.dumps(data, default=str)}\n\n"
        finally:
            updates.close()  # a client gone stops its run

    return Response(frames(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})


def _chat(request: Request) -> Response:
    """The OpenAI-compatible facade (see chat.py); a client that hangs up cancels its run."""
    caller = _caller(request)
    body = validate(chat.ChatRequest, parse_json(_body(request)))
    traceparent = request.headers.get("traceparent")
    # admitted before any stream: a request infer cannot run is a 4xx
    admitted, ticket = _admit(chat.to_infer_request(body), caller)
    if body.stream:
        frames = chat.stream(body, ticket.run_id, _updates(admitted, ticket, traceparent))
        return Response(frames, mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})
    with _cancelled_on_hang_up(request, ticket.run_id, caller.name):
        result = _run(admitted, ticket, traceparent)
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

            def run(request: InferRequest, emit: Any, cancelled: Any, caller: Caller) -> Any:
                return _run(*_admit(request, caller), None, emit, cancelled)

            def stop(run_id: str, caller: Caller) -> None:
                service().stop(run_id, caller.name)

            settings = dataclasses.replace(SETTINGS, max_runs=SETTINGS.run_bound())
            surface = Surface(run=run, stop=stop, settings=settings, who=mcp_http.who)
            _mcp_served = mcp_http.McpApp(
                build_server(surface), SETTINGS.max_context_bytes + _BODY_SLACK
            )
        return _mcp_served


def _updates(
    request: InferRequest, ticket: Ticket, traceparent: str | None
) -> Generator[tuple[str, Any], None, None]:
    """A run on a thread of its own, as it goes: ("idle", None) as soon as it is started, then
    ("run", {run_id, cancel_token}) once the ledger has it, each progress event, ("idle", None)
    every `_HEARTBEAT_S` without one, and ("result", InferResult) or ("error", RLMError).

    Closing the generator before the end stops the run: a server sends what it yields, so a
    client that went away is found out by the next idle beat at the latest.
    """
    run_id, caller = ticket.run_id, ticket.caller.name
    updates: queue.Queue[tuple[str, Any]] = queue.Queue()
    gone = threading.Event()

    def started(run_id: str, cancel_token: str) -> None:
        updates.put(("run", {"run_id": run_id, "cancel_token": cancel_token}))

    def work() -> None:
        try:
            emit = lambda k, d: updates.put((k, d))  # noqa: E731
            result = _run(request, ticket, traceparent, emit, gone.is_set, started)
            updates.put(("result", result))
        except RLMError as problem:
            updates.put(("error", problem))
        except Exception:  # a bug: the stream ends with a 500's message, not in silence
            log.exception("internal error")
            updates.put(("error", RLMError("internal error in rlm.infer; see its logs")))

    threading.Thread(target=work, daemon=True).start()
    try:
        yield "idle", None
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
    later (409); a run whose pod died is resumed from its last checkpoint.

    The caller's key is the event's `rlmkey` extension attribute (the Broker carries it from
    the producer), else the request's Authorization header. Events are the caller's own: the
    same source, id and data from another caller is another event."""
    binary_key = request.headers.get(f"ce-{EVENT_KEY_ATTRIBUTE}")
    caller = _event_caller(binary_key, request) if binary_key else None  # before the body
    body = _body(request)
    event = events.parse(dict(request.headers), body, events.INFER_REQUESTED)
    if caller is None:
        key = event.get(EVENT_KEY_ATTRIBUTE)
        caller = _event_caller(key if isinstance(key, str) else None, request)
    ledger = service().ledger
    key = event_key(str(event["source"]), str(event["id"]), event.data, caller.name)
    state, answered = ledger.claim_event(key, SETTINGS.event_ttl_s)
    if state == "answered":
        log.info("redelivered event answered from the ledger", extra={"event_id": key[:16]})
        kind, data = answered
    else:
        try:
            kind, data = _answer_event(event, request, key, caller)
        except Conflict:
            raise  # its first delivery still runs
        except BaseException:
            if state == "new":
                ledger.forget_event(key)  # no answer: a redelivery runs it
            raise
        ledger.answer_event(key, [kind, data], SETTINGS.event_ttl_s)
    headers, payload = events.reply(kind, events.SOURCE_INFER, data, subject=event["id"])
    return Response(payload, status=200, headers=headers)


def _event_caller(key: str | None, request: Request) -> Caller:
    header = f"Bearer {key}" if key else request.headers.get("authorization")
    return callers.authenticate(KEYS, header)


def _answer_event(
    event: Any, request: Request, key: str, caller: Caller
) -> tuple[str, dict[str, Any]]:
    try:
        infer_request = validate(InferRequest, event.data)
        if infer_request.run_id is None:  # one event, one run: a redelivery may resume it
            infer_request = infer_request.model_copy(update={"run_id": f"event-{key[:32]}"})
        result = _run(*_admit(infer_request, caller), request.headers.get("traceparent"))
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

"""The execute function: runs one REPL cell of untrusted Python in the WebAssembly sandbox.

    functions-framework --source functions/execute/main.py --target execute

Routes: POST /execute and POST / (JSON, or a CloudEvent `<prefix>.execute.requested`),
GET /health, /health/liveness, /health/readiness, GET /metrics, GET /openapi.json.
"""

from __future__ import annotations

import logging
import sys
import threading

import functions_framework
from flask import Request, Response

from functions import events, logs
from functions.config import ConfigError
from functions.contract import EXECUTE_BYTES_TYPE, ExecuteRequest, media_type, unframed
from functions.errors import BadCell, BadRequest, MissingRefs, RLMError, Saturated, Unavailable
from functions.execute import metrics
from functions.execute.cells import CellRunner
from functions.execute.settings import ExecuteSettings
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
from functions.server import EdgeLimits, serve_hardened

log = logging.getLogger("rlm.execute")

try:
    SETTINGS = ExecuteSettings.from_env()
except ConfigError as e:
    sys.exit(f"execute: configuration error: {e}")
logs.setup()

# The runner holds wasmtime engines, which do not survive fork(): it is made on first use,
# in the worker process, never at import (functions-framework imports before forking).
_runner: CellRunner | None = None
_runner_lock = threading.Lock()
_ready = threading.Event()


def runner() -> CellRunner:
    global _runner
    with _runner_lock:
        if _runner is None:
            _runner = CellRunner(SETTINGS)
            threading.Thread(target=_warm_up, args=(_runner,), daemon=True).start()
        return _runner


def _warm_up(cells: CellRunner) -> None:
    try:
        cells.prewarm()
    except Exception:
        log.exception("the sandbox could not start")
        return
    _ready.set()


ROUTES = "POST /execute, POST /, GET /health, GET /metrics"
json_errors(ROUTES)
serve_hardened(
    EdgeLimits(SETTINGS.read_timeout_s, SETTINGS.max_header_bytes, SETTINGS.max_request_bytes)
)


@functions_framework.http
def execute(request: Request) -> Response:
    return answer(_route, request, log)


def _route(request: Request) -> Response:
    path = request.path.rstrip("/") or "/"
    if request.method == "GET" and path in HEALTH_PATHS:
        runner()
        if path == "/health/readiness" and not _ready.is_set():
            raise Unavailable("the sandbox is still loading")
        return json_response({"status": "ok", "ready": _ready.is_set()})
    if request.method == "GET" and path == "/metrics":
        metrics.live_sessions.set(len(runner().sessions))
        return metrics_response(metrics.REGISTRY, metrics.refresh_process_gauges)
    if request.method == "GET" and path == "/openapi.json":
        from functions.execute.openapi import document

        return json_response(document())
    if request.method == "POST" and path in ("/", "/execute"):
        if events.is_cloudevent(request.headers):
            return _serve_event(request)
        body = read_body(request, SETTINGS.max_request_bytes)
        cell = parse_cell(body, request.content_type)
        return json_response(run_cell(cell, request.headers.get("traceparent")))
    raise not_found(request, ROUTES)


def parse_cell(body: bytes, content_type: str | None) -> ExecuteRequest:
    """The request: JSON, or JSON with its contexts' canonical bytes after it
    (`EXECUTE_BYTES_TYPE`), each bound to its ref as bytes, never decoded here."""
    if media_type(content_type) != EXECUTE_BYTES_TYPE:
        return json_cell(parse_json(body))
    try:
        head, data = unframed(body, EXECUTE_BYTES_TYPE)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    cell = validate(ExecuteRequest, parse_json(head))
    at = 0
    for ref in (cell.rlm_context, *(cell.rlm_contexts or ())):
        if ref is None or ref.data_bytes is None:
            continue
        if ref.data is not None or ref.data_kind is None:
            raise BadRequest("a context sent as bytes has data_bytes and data_kind, not data")
        ref.data, at = data[at : at + ref.data_bytes], at + ref.data_bytes
    if at != len(data):
        raise BadRequest(f"the contexts' data_bytes add up to {at:,}; {len(data):,} bytes came")
    return cell


def json_cell(value: object) -> ExecuteRequest:
    """A request that came as JSON: its contexts' data, if any, is in it."""
    cell = validate(ExecuteRequest, value)
    if any(
        ref and ref.data_bytes is not None for ref in (cell.rlm_context, *(cell.rlm_contexts or ()))
    ):
        raise BadRequest(f"data_bytes comes only with a {EXECUTE_BYTES_TYPE} body; send data")
    return cell


# The outcome label each refusal counts under; the refusal itself is the answer (409/422/503).
REFUSALS = {MissingRefs: "missing", BadCell: "invalid", Saturated: "saturated"}


def run_cell(cell: ExecuteRequest, traceparent: str | None = None):
    """Run a validated request; a refusal is counted and raised as it is."""
    try:
        response = runner().run(cell, traceparent)
    except (MissingRefs, BadCell, Saturated) as e:
        metrics.requests_total.labels(outcome=REFUSALS[type(e)]).inc()
        raise
    outcome = "trapped" if response.trapped else "error" if response.error else "ok"
    metrics.requests_total.labels(outcome=outcome).inc()
    if response.error and not response.trapped:
        metrics.errors_total.labels(kind="exception").inc()
    log.info(
        "cell %s",
        outcome,
        extra={"session_id": cell.session_id, "duration_s": round(response.execution_time, 4)},
    )
    return response


def _serve_event(request: Request) -> Response:
    body = read_body(request, SETTINGS.max_request_bytes)
    event = events.parse(dict(request.headers), body, events.EXECUTE_REQUESTED)
    try:
        cell = json_cell(event.data)
        result = run_cell(cell, request.headers.get("traceparent"))
        headers, data = events.reply(
            events.EXECUTE_COMPLETED,
            events.SOURCE_EXECUTE,
            result.model_dump(mode="json"),
            subject=event["id"],
        )
    except RLMError as problem:
        if problem.status == 503:
            raise  # the broker redelivers later
        headers, data = events.reply(
            events.EXECUTE_FAILED,
            events.SOURCE_EXECUTE,
            {"error": problem.message, "status": problem.status, "detail": problem.detail},
            subject=event["id"],
        )
    return Response(data, status=200, headers=headers)

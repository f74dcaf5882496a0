"""The execute function's OpenAPI document, served at /openapi.json."""

from __future__ import annotations

from typing import Any

from functions.contract import ExecuteRequest, ExecuteResponse, Missing
from functions.openapi import Health
from functions.openapi import document as build


def document() -> dict[str, Any]:
    statuses = (400, 404, 408, (409, Missing), 413, 414, 422, 431, 503)
    return build(
        "rlm execute",
        [
            ("/execute", "Run one REPL cell in the sandbox", ExecuteRequest, ExecuteResponse,
             statuses),
            ("/", "Same as /execute", ExecuteRequest, ExecuteResponse, statuses),
            ("/health", "Liveness", None, Health, ()),
            ("/health/readiness", "Ready once the sandbox is loaded", None, Health, (503,)),
        ],
    )  # fmt: skip

"""The infer function's OpenAPI document, served at /openapi.json."""

from __future__ import annotations

from typing import Any

from functions.contract import InferRequest, InferResult, SubcallRequest, SubcallResponse
from functions.openapi import Health
from functions.openapi import document as build


def document() -> dict[str, Any]:
    # A run that failed (the model unreachable, the sandbox down) is a 502 with its result.
    statuses = (400, 404, 413, 422, 429, (502, InferResult))
    return build(
        "rlm infer",
        [
            ("/infer", "Run a Recursive Language Model", InferRequest, InferResult, statuses),
            ("/", "Same as /infer", InferRequest, InferResult, statuses),
            ("/subcalls", "Sub-calls from sandboxed code (bearer token)", SubcallRequest,
             SubcallResponse, (400, 401, 403, 422)),
            ("/health", "Liveness", None, Health, ()),
        ],
    )  # fmt: skip

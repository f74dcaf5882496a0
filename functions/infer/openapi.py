"""The infer function's OpenAPI document, served at /openapi.json."""

from __future__ import annotations

from typing import Any

from functions.contract import (
    CancelReply,
    InferRequest,
    InferResult,
    SubcallRequest,
    SubcallResponse,
)
from functions.openapi import Health
from functions.openapi import document as build


def document(keys: bool = True) -> dict[str, Any]:
    """`keys`: callers send an API key (`INFER_AUTH=keys`), and the document says so."""
    # A run that failed (the model unreachable, the sandbox down) is a 502 with its result.
    statuses = (400, 401, 403, 404, 409, 413, 422, 429, (502, InferResult))
    doc = build(
        "rlm infer",
        [
            ("/infer", "Run a Recursive Language Model", InferRequest, InferResult, statuses),
            ("/", "Same as /infer", InferRequest, InferResult, statuses),
            ("/subcalls", "Sub-calls from sandboxed code (bearer token)", SubcallRequest,
             SubcallResponse, (400, 401, 403, 422)),
            ("/health", "Liveness", None, Health, ()),
        ],
        extra_models=[CancelReply],
    )  # fmt: skip
    doc["paths"]["/infer/{run_id}/cancel"] = {"post": {
        "summary": "Cancel a run of this instance: it ends with stop_reason cancelled and usage",
        "parameters": [{"name": "run_id", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {
            "202": {"description": "cancelling", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/CancelReply"}}}},
            **{str(status): {"description": reason, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Problem"}}}}
               for status, reason in ((401, "no API key, or not a known one"),
                                      (403, "local mode: the run's cancel token is missing"),
                                      (404, "no run of yours by that id is in progress"))},
        },
    }}  # fmt: skip
    if keys:  # every operation but /health and /subcalls (the sandbox's own tokens) needs one
        doc["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"apiKey": []}]
        for path in ("/health", "/subcalls"):
            for operation in doc["paths"][path].values():
                operation["security"] = []
    return doc

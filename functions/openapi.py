"""OpenAPI documents for both functions, built from the contract's pydantic models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from functions.contract import Problem


def _schema(models: list[type[BaseModel]]) -> dict[str, Any]:
    components: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
    return components


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}


Status = int | tuple[int, type[BaseModel]]  # a status answered with a Problem, or another body


def _problems(*statuses: Status) -> dict[str, Any]:
    answers = {}
    for status in statuses:
        code, model = status if isinstance(status, tuple) else (status, Problem)
        answers[str(code)] = {"description": "not done: the body says why and what to do",
                              "content": _json(model.__name__)}  # fmt: skip
    return answers


def document(
    title: str,
    operations: list[tuple[str, str, type[BaseModel] | None, type[BaseModel], tuple[Status, ...]]],
    extra_models: Sequence[type[BaseModel]] = (),
) -> dict[str, Any]:
    """`operations`: (path, summary, request model, response model, statuses other than 200);
    `extra_models`: schemas of paths the caller adds to the document itself."""
    models: list[type[BaseModel]] = [Problem, *extra_models]
    paths: dict[str, Any] = {}
    for path, summary, request, response, statuses in operations:
        models += [m for m in (request, response) if m is not None]
        models += [s[1] for s in statuses if isinstance(s, tuple)]
        operation: dict[str, Any] = {
            "summary": summary,
            "responses": {
                "200": {"description": "done", "content": _json(response.__name__)},
                **_problems(*statuses),
            },
        }
        if request is not None:
            operation["requestBody"] = {"required": True, "content": _json(request.__name__)}
            paths[path] = {"post": operation}
        else:
            paths[path] = {"get": operation}
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "1"},
        "paths": paths,
        "components": {"schemas": _schema(models)},
    }


class Health(BaseModel):
    status: str
    ready: bool | None = None

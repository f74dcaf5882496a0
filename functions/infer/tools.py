"""Caller-defined tools the guest calls by name (`custom_tools`, `custom_sub_tools`).

A tool is an HTTP endpoint (infer checks the arguments against its JSON Schema and POSTs them
to its URL) or, embedded, a function of this process (the SDK registers it under a `ref`).
Each cell's token holds the sha256 of every spec it may call, so the execute plane carries
the specs but cannot change one, and any infer process can serve the call.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from functions import http
from functions.contract import ToolCatalog, ToolSpec
from functions.errors import RLMError, Unprocessable
from functions.infer.schemas import SchemaError, compile_schema
from functions.infer.tokens import OutOfScope, TokenClaims
from functions.urls import Allowlist, UrlRefused

# Names the guest already has (as the official library reserves them, plus ours).
RESERVED = frozenset({"llm_query", "llm_query_batched", "rlm_query", "rlm_query_batched",
                      "SHOW_VARS", "answer", "context", "history", "FINAL", "FINAL_VAR",
                      "SubcallError", "ToolError"})  # fmt: skip


class BadCatalog(Unprocessable, ValueError):
    """A request's tool catalog this process cannot serve."""


class ToolCallError(RLMError):
    """A tool call failed; the guest's `ToolError` carries this message."""


def digest(spec: ToolSpec) -> str:
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()


def catalog_digest(catalog: ToolCatalog) -> str:
    if not catalog:
        return ""
    text = json.dumps({n: digest(s) for n, s in sorted(catalog.items())})
    return hashlib.sha256(text.encode()).hexdigest()


def check_catalog(
    catalog: ToolCatalog,
    functions: Mapping[str, Callable[..., Any]],
    allowed: Allowlist,
    max_schema_bytes: int | None = None,
) -> None:
    """Raise `BadCatalog` for a reserved name, a parameters schema that cannot be used, or a
    spec this process cannot or may not call (an HTTP tool's url must be one `allowed` takes:
    the operator's RLM_TOOL_URL_PREFIXES)."""
    for name, spec in catalog.items():
        try:
            compile_schema(spec.parameters, f"tool {name!r}: parameters", max_schema_bytes)
        except SchemaError as e:
            raise BadCatalog(e.message) from None
        if name in RESERVED:
            raise BadCatalog(f"tool name {name!r} is reserved ({', '.join(sorted(RESERVED))})")
        if spec.url is None and spec.ref not in functions:
            raise BadCatalog(f"tool {name!r} needs a url")
        if spec.url and not allowed:
            raise BadCatalog(
                f"tool {name!r}: this infer calls no HTTP tools; its operator allows them by "
                "URL prefix in RLM_TOOL_URL_PREFIXES (a tool is called from infer's network)"
            )
        if spec.url:
            try:
                allowed.check(spec.url, f"tool {name!r}: url")
            except UrlRefused as e:
                raise BadCatalog(e.message) from None


def authorize(claims: TokenClaims, name: str, catalog: ToolCatalog) -> ToolSpec:
    """The spec of tool `name` if the token covers exactly that spec; else `OutOfScope`."""
    spec = catalog.get(name)
    if name not in claims.tools:
        allowed = ", ".join(sorted(claims.tools)) or "none"
        raise OutOfScope(f"no tool named {name!r} in this run (tools: {allowed})")
    if spec is None or digest(spec) != claims.tools[name]:
        raise OutOfScope(f"tool {name!r} does not match the one this run declared")
    return spec


def function_spec(name: str, entry: Any) -> tuple[ToolSpec, Callable[..., Any]]:
    """The SDK's `custom_tools` entry (a callable, or `{"tool": fn, "description": ...}`)."""
    fn, description = entry, None
    if isinstance(entry, dict) and "tool" in entry:
        fn, description = entry["tool"], entry.get("description")
    if not callable(fn):
        raise TypeError(f"custom tool {name!r} must be callable (put data in the context)")
    signature = "(*args, **kwargs)"
    for resolve in (True, False):  # resolved annotations read better than their strings
        try:
            signature = str(inspect.signature(fn, eval_str=resolve))
            break
        except Exception:
            continue
    doc = description or inspect.getdoc(fn) or ""
    spec = ToolSpec(description=doc[:4000], signature=signature[:1000],
                    ref=f"{name}-{uuid.uuid4().hex[:12]}")  # fmt: skip
    return spec, fn


def bind(schema: Mapping[str, Any], args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional arguments take the schema's property names in order."""
    names = list((schema.get("properties") or {}).keys())
    if len(args) > len(names):
        raise ToolCallError(f"takes {len(names)} positional arguments but {len(args)} were given")
    bound = dict(zip(names, args, strict=False))
    for key in kwargs:
        if key in bound:
            raise ToolCallError(f"got multiple values for argument {key!r}")
    return {**bound, **kwargs}


def check_arguments(schema: Mapping[str, Any], arguments: dict[str, Any]) -> None:
    try:
        problems = compile_schema(schema, "the tool's schema", None).problems(arguments)
    except SchemaError as e:
        raise ToolCallError(e.message) from None
    if problems:
        raise ToolCallError(f"arguments do not match the schema: {'; '.join(problems[:3])}")


class ToolRunner:
    """Calls tools: functions registered by `ref`, or HTTP endpoints `allowed` takes."""

    def __init__(self, allowed: Allowlist) -> None:
        self.functions: dict[str, Callable[..., Any]] = {}
        self.allowed = allowed
        self._client = http.client(30.0, follow_redirects=False)

    def call(self, name: str, spec: ToolSpec, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """The tool's JSON result; raises `ToolCallError` with a short message."""
        try:
            if spec.url is None:
                fn = self.functions.get(spec.ref or "")
                if fn is None:
                    raise ToolCallError("not available in this process")
                result = fn(*args, **kwargs)
            else:
                arguments = bind(spec.parameters, args, kwargs)
                check_arguments(spec.parameters, arguments)
                result = self._post(spec, arguments)
            return json.loads(json.dumps(result))
        except ToolCallError as e:
            raise ToolCallError(f"{name}: {e}") from None
        except (TypeError, ValueError) as e:
            raise ToolCallError(f"{name}: {type(e).__name__}: {e}"[:500]) from None
        except Exception as e:  # the caller's own function raised
            raise ToolCallError(f"{name} raised {type(e).__name__}: {e}"[:500]) from None

    def _post(self, spec: ToolSpec, arguments: dict[str, Any]) -> Any:
        try:  # resolved where it is called: the address checked is the one dialled
            target = self.allowed.target(spec.url or "", "url")
        except UrlRefused as e:
            raise ToolCallError(e.message) from None
        try:
            response = self._client.post(
                target.connect_url, json=arguments, timeout=spec.timeout_s, **target.options()
            )
        except httpx.TimeoutException:
            raise ToolCallError(f"timed out after {spec.timeout_s:g} s") from None
        except httpx.HTTPError as e:
            raise ToolCallError(f"unreachable: {type(e).__name__}") from None
        if response.status_code >= 300:
            raise ToolCallError(f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            return response.json()
        except ValueError:
            return response.text

    def close(self) -> None:
        self._client.close()


def prompt_section(catalog: ToolCatalog) -> str:
    """What the model is told about its tools (empty when it has none)."""
    if not catalog:
        return ""
    lines = ["Tools you can call from the REPL (arguments and results are JSON values; a "
             "failing call raises ToolError):"]  # fmt: skip
    for name, spec in catalog.items():
        signature = spec.signature or _signature(spec.parameters)
        text = " ".join(spec.description.split())[:600] or "a custom function"
        lines.append(f"- `{name}{signature}`: {text}")
    return "\n".join(lines)


def _signature(schema: Mapping[str, Any]) -> str:
    required = set(schema.get("required") or [])
    parts = []
    for key, prop in (schema.get("properties") or {}).items():
        kind = prop.get("type", "any") if isinstance(prop, dict) else "any"
        parts.append(f"{key}: {kind}" + ("" if key in required else " = None"))
    return f"({', '.join(parts)})"

"""The SDK's extra arguments, in the official library's terms, turned into this project's.

`custom_tools` / `custom_sub_tools` entries are callables (or `{"tool": fn, "description"}`)
that run in this process; `other_backend_kwargs` and `endpoints` name more OpenAI-compatible
endpoints, each with its own base_url and key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from functions.contract import ToolSpec
from functions.infer.routing import Endpoint
from functions.infer.tools import ToolRunner, function_spec


def register_tools(
    runner: ToolRunner,
    custom_tools: Mapping[str, Any] | None,
    custom_sub_tools: Mapping[str, Any] | None,
) -> dict[str, dict[str, ToolSpec] | None]:
    """Register the callables with `runner`; the request fields that declare them.

    As in the official library, `custom_sub_tools=None` gives child RLMs the same tools and
    `{}` gives them none.
    """

    def catalog(entries: Mapping[str, Any] | None) -> dict[str, ToolSpec] | None:
        if entries is None:
            return None
        specs = {}
        for name, entry in entries.items():
            spec, fn = function_spec(name, entry)
            runner.functions[spec.ref or ""] = fn
            specs[name] = spec
        return specs

    return {"custom_tools": catalog(custom_tools), "custom_sub_tools": catalog(custom_sub_tools)}


def endpoints(
    named: Mapping[str, Mapping[str, Any]] | None,
    other_backend_kwargs: list[dict[str, Any]] | None,
    other_backends: list[str] | None = None,
) -> dict[str, Endpoint]:
    """`endpoints={"name": {"base_url", "api_key" | "api_key_env", "models": [...]}}` and the
    official `other_backend_kwargs=[{"model_name", "base_url", "api_key"}]` (its model
    becomes the sub-model, served by that endpoint)."""
    if other_backends is not None and len(other_backends) != len(other_backend_kwargs or []):
        raise ValueError("other_backends and other_backend_kwargs must have the same length")
    found = {}
    for name, spec in (named or {}).items():
        key = spec.get("api_key") or os.environ.get(spec.get("api_key_env") or "", "")
        if not spec.get("base_url") or not spec.get("models"):
            raise ValueError(f"endpoint {name!r} needs base_url and models")
        found[name] = Endpoint(spec["base_url"], key or "none", tuple(spec["models"]))
    for i, kwargs in enumerate(other_backend_kwargs or []):
        if kwargs.get("base_url") and kwargs.get("model_name"):
            key = kwargs.get("api_key") or "none"
            found[f"other_backend_{i}"] = Endpoint(kwargs["base_url"], key, (kwargs["model_name"],))
    return found

"""The SDK's extra arguments, in the official library's terms, turned into this project's.

`backend=` names one of the official library's backends: those that speak the OpenAI API are
mapped to an endpoint and key as that library finds them, the others are refused. Its
`environment=` names all run the model's code in this project's WebAssembly sandbox.
`custom_tools` / `custom_sub_tools` entries are callables (or `{"tool": fn, "description"}`)
that run in this process; `other_backend_kwargs` and `endpoints` name more OpenAI-compatible
endpoints, each with its own base_url and key.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from functions.config import ConfigError
from functions.contract import ToolSpec
from functions.infer.routing import Endpoint
from functions.infer.tools import ToolRunner, function_spec

# The official library's backends that speak the OpenAI API: their base URL (None: see
# `backend_settings`) and the variable their key is read from when none is given.
OPENAI_COMPATIBLE_BACKENDS: dict[str, tuple[str | None, str | None]] = {
    "openai": (None, "OPENAI_API_KEY"),
    "vllm": (None, None),
    "openrouter": ("https://openrouter.ai/api/v1", "OPENROUTER_API_KEY"),
    "vercel": ("https://ai-gateway.vercel.sh/v1", "AI_GATEWAY_API_KEY"),
}
OTHER_BACKENDS = ("anthropic", "gemini", "azure_openai", "portkey")
BACKEND_KWARGS = ("model_name", "base_url", "api_key")
OFFICIAL_ENVIRONMENTS = ("local", "ipython", "docker", "modal", "prime", "daytona", "e2b")
ENVIRONMENTS = ("wasm", "remote")


def backend_settings(
    backend: str | None, backend_kwargs: Mapping[str, Any], env: Mapping[str, str]
) -> dict[str, str]:
    """The LLM_BASE_URL, LLM_API_KEY and LLM_MODEL that `backend_kwargs` give; with `backend`,
    what that library's backend would use where they give none. `ConfigError` for a backend that
    is not OpenAI-compatible and for arguments not understood."""
    unknown = sorted(set(backend_kwargs) - set(BACKEND_KWARGS))
    if unknown:
        raise ConfigError(
            f"backend_kwargs {unknown} are not understood here: give {', '.join(BACKEND_KWARGS)}"
            " (sampling arguments and client options are not passed on)"
        )
    given = {
        "LLM_BASE_URL": backend_kwargs.get("base_url"),
        "LLM_API_KEY": backend_kwargs.get("api_key"),
        "LLM_MODEL": backend_kwargs.get("model_name"),
    }
    if backend is not None:
        if backend in OTHER_BACKENDS:
            raise ConfigError(
                f"backend={backend!r} is not OpenAI-compatible and is not supported here: use "
                "backend='openai' with backend_kwargs={'base_url': ...} of the provider's "
                "OpenAI-compatible endpoint (Anthropic, Gemini and Azure OpenAI have one)"
            )
        if backend not in OPENAI_COMPATIBLE_BACKENDS:
            raise ConfigError(
                f"unknown backend {backend!r}: use one of {', '.join(OPENAI_COMPATIBLE_BACKENDS)}"
            )
        base_url, key_variable = OPENAI_COMPATIBLE_BACKENDS[backend]
        if backend == "openai":  # as the openai client finds it
            base_url = env.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        if backend == "vllm" and not given["LLM_BASE_URL"]:
            raise ConfigError("backend='vllm' needs backend_kwargs={'base_url': the server's URL}")
        given["LLM_BASE_URL"] = given["LLM_BASE_URL"] or base_url
        given["LLM_API_KEY"] = given["LLM_API_KEY"] or env.get(key_variable or "")
    return {name: value for name, value in given.items() if value}


def environment(name: str, options: Mapping[str, Any]) -> str:
    """The environment to build: "wasm" or "remote". The official library's names run in the
    sandbox too, and one line on stderr says so."""
    if name in ENVIRONMENTS:
        return name
    if name in OFFICIAL_ENVIRONMENTS:
        unused = "; its environment_kwargs are not used" if options else ""
        print(
            f"rlm: environment={name!r}: the model's code runs in this project's WebAssembly "
            f"sandbox (CPython on WASI, in this process){unused}",
            file=sys.stderr,
        )
        return "wasm"
    accepted = ", ".join(repr(n) for n in (*ENVIRONMENTS, *OFFICIAL_ENVIRONMENTS))
    raise ConfigError(f"environment must be one of {accepted}, not {name!r}")


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

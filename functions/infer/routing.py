"""Which model serves a call, and which OpenAI-compatible endpoint serves a model.

A run may name several models: the root model, the sub-model, a default per depth
(`models_by_depth`) and an allowlist of others the guest may pick with `model=`. Each model
goes to the endpoint that lists it (`RLM_ENDPOINTS`, or the SDK's `endpoints=`), else to the
default one (`LLM_BASE_URL`). Keys come from infer's environment, never from a request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from functions.config import ConfigError


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    api_key: str
    models: tuple[str, ...]


def parse_endpoints(text: str, env: Mapping[str, str]) -> dict[str, Endpoint]:
    """`RLM_ENDPOINTS`: `{"name": {"base_url", "api_key_env", "models": [...]}}`.

    The key is read from the variable `api_key_env` names. Raises `ConfigError` on anything
    malformed, naming the endpoint.
    """
    if not text.strip():
        return {}
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"RLM_ENDPOINTS is not JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError("RLM_ENDPOINTS must be a JSON object of endpoints by name")
    endpoints = {}
    for name, spec in raw.items():
        where = f"RLM_ENDPOINTS[{name!r}]"
        if not isinstance(spec, dict) or not str(spec.get("base_url", "")).startswith("http"):
            raise ConfigError(f"{where} needs a base_url starting with http(s)://")
        models = spec.get("models")
        if (
            not isinstance(models, list)
            or not models
            or not all(isinstance(m, str) for m in models)
        ):
            raise ConfigError(f"{where} needs models: a non-empty list of model names")
        key_env = spec.get("api_key_env", "")
        if not key_env or not env.get(key_env):
            raise ConfigError(f"{where}: api_key_env must name a set variable (got {key_env!r})")
        endpoints[name] = Endpoint(spec["base_url"], env[key_env], tuple(models))
    return endpoints


def default_model(
    depth: int, model: str, sub_model: str | None, by_depth: Mapping[int, str]
) -> str:
    """The model of a sub-call (or child RLM) made by a cell at `depth` that names none."""
    return by_depth.get(depth + 1) or sub_model or model


def allowed_models(
    model: str, sub_model: str | None, by_depth: Mapping[int, str], extra: Iterable[str]
) -> list[str]:
    """Every model a run may use, the run's own first (a token's `models` claim)."""
    names = [model, sub_model, *by_depth.values(), *extra]
    return list(dict.fromkeys(n for n in names if n))


class RoutedLLM:
    """Several clients behind the one `complete` the loop calls: each model to its endpoint."""

    def __init__(self, default: Any, by_model: Mapping[str, Any]) -> None:
        self.default = default
        self.by_model = dict(by_model)
        self.prices = default.prices

    def complete(self, messages: Any, model: str, **options: Any) -> Any:
        return self.by_model.get(model, self.default).complete(messages, model, **options)

    def close(self) -> None:
        for client in {id(c): c for c in [self.default, *self.by_model.values()]}.values():
            client.close()


def routed(default: Any, endpoints: Mapping[str, Endpoint], make: Callable[[str, str], Any]) -> Any:
    """`default` alone, or a `RoutedLLM` with one client (`make(base_url, key)`) per endpoint."""
    if not endpoints:
        return default
    by_model = {}
    for endpoint in endpoints.values():
        client = make(endpoint.base_url, endpoint.api_key)
        by_model.update(dict.fromkeys(endpoint.models, client))
    return RoutedLLM(default, by_model)

"""Reading settings from the environment: a bad value fails at start with one clear line."""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import urlparse

from functions.errors import RLMError


class ConfigError(RLMError, ValueError):
    """A setting is missing or malformed; the message names it and says what it should be."""


def env_str(name: str, default: str | None = None, env: Mapping[str, str] | None = None) -> str:
    value = (env if env is not None else os.environ).get(name, "").strip()
    if value:
        return value
    if default is None:
        raise ConfigError(f"{name} is not set")
    return default


def env_int(name: str, default: int, minimum: int = 0, env: Mapping[str, str] | None = None) -> int:
    raw = (env if env is not None else os.environ).get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}")
    return value


def env_float(
    name: str, default: float, minimum: float = 0.0, env: Mapping[str, str] | None = None
) -> float:
    raw = (env if env is not None else os.environ).get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}")
    return value


def env_bool(name: str, default: bool, env: Mapping[str, str] | None = None) -> bool:
    raw = (env if env is not None else os.environ).get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not true or false")


def env_url(name: str, default: str | None = None, env: Mapping[str, str] | None = None) -> str:
    value = env_str(name, default, env)
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"{name}={value!r} is not an http(s) URL")
    return value.rstrip("/")

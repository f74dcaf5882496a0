"""The infer plane's settings, read once from the environment at start."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from functions.config import ConfigError, env_float, env_int, env_str, env_url
from functions.infer.compaction import parse_windows
from functions.infer.routing import Endpoint, parse_endpoints

MIB = 1 << 20

# Every variable this plane reads; the manifests are checked against this list.
ENV_NAMES = (
    "LLM_API_KEY",
    "LLM_BASE_URL",
    "LLM_MODEL",
    "LLM_SUB_MODEL",
    "LLM_TIMEOUT",
    "LLM_MAX_RETRIES",
    "LLM_TIMEOUT_RETRIES",
    "LLM_PRICES",
    "WASM_SERVICE_URL",
    "INFER_CALLBACK_URL",
    "RLM_TOKEN_KEY",
    "MAX_DEPTH",
    "MAX_ITERATIONS",
    "INFER_CELL_TIMEOUT",
    "INFER_MAX_RUNS",
    "INFER_SUBCALL_CONCURRENCY",
    "INFER_MAX_CONTEXT_MB",
    "INFER_OUTPUT_CHARS",
    "K_SINK",
    "INFER_CONVERSATION_TTL",
    "INFER_CONVERSATION_MAX_MB",
    "RLM_COMPACTION_THRESHOLD",
    "LLM_CONTEXT_WINDOWS",
    "RLM_ENDPOINTS",
    "RLM_TOOL_URL_PREFIXES",
    "INFER_CONTEXT_URL_PREFIXES",
    "THREADS",
    "INFER_STORE_URL",
    "INFER_STORE_PASSWORD",
    "INFER_CELL_SUBCALLS",
    "INFER_MAX_CHILDREN",
    "LLM_MAX_OUTPUT_TOKENS",
    "INFER_EVENT_TTL",
)
REQUIRED_ENV = ("LLM_API_KEY", "LLM_BASE_URL", "LLM_MODEL", "WASM_SERVICE_URL", "RLM_TOKEN_KEY")


@dataclass(frozen=True)
class InferSettings:
    api_key: str
    base_url: str
    model: str
    sub_model: str | None = None
    llm_timeout_s: float = 120.0
    llm_max_retries: int = 4
    llm_timeout_retries: int = 1  # LLM_TIMEOUT_RETRIES: of those, after a timed-out call
    prices_json: str = ""  # LLM_PRICES: {"model": [usd per 1M input, usd per 1M output]}
    execute_url: str = ""  # WASM_SERVICE_URL; empty: embedded sandbox in this process
    callback_url: str = ""  # INFER_CALLBACK_URL: how the execute plane reaches /subcalls
    token_key: bytes = b""  # RLM_TOKEN_KEY: signs sub-call tokens; only infer holds it
    max_depth: int = 1
    max_iterations: int = 30
    cell_timeout_s: float = 300.0  # INFER_CELL_TIMEOUT: the wall deadline infer gives a cell
    max_runs: int = 32  # INFER_MAX_RUNS: runs at once in this process; more get 429
    subcall_concurrency: int = 32  # INFER_SUBCALL_CONCURRENCY: a batch's fan-out bound
    max_context_bytes: int = 256 * MIB  # INFER_MAX_CONTEXT_MB
    output_chars: int = 20_000  # INFER_OUTPUT_CHARS: a cell's output shown to the model
    sink_url: str = ""  # K_SINK: progress events go here when set
    conversation_ttl_s: float = 3600.0  # INFER_CONVERSATION_TTL: kept after a conversation's turn
    conversation_max_bytes: int = 512 * MIB  # INFER_CONVERSATION_MAX_MB: state + contexts, each
    compaction_threshold: float = 0.85  # RLM_COMPACTION_THRESHOLD: of the root's context window
    context_windows_json: str = ""  # LLM_CONTEXT_WINDOWS: {"model": tokens} over the defaults
    endpoints: dict[str, Endpoint] = field(default_factory=dict)  # RLM_ENDPOINTS: more LLMs
    tool_url_prefixes: tuple[str, ...] = ()  # RLM_TOOL_URL_PREFIXES: where tools may be; ()=none
    context_url_prefixes: tuple[str, ...] = ()  # INFER_CONTEXT_URL_PREFIXES: likewise context_uri
    threads: int = 4 * (os.cpu_count() or 1)  # THREADS: gunicorn's threads (the served function)
    store_url: str = ""  # INFER_STORE_URL: redis://… the run ledger; empty: in this process
    store_password: str = ""  # INFER_STORE_PASSWORD: the ledger's password (from a Secret)
    cell_subcalls: int = 1000  # INFER_CELL_SUBCALLS: sub-call prompts and tool calls per cell
    max_children: int = 8  # INFER_MAX_CHILDREN: child RLMs one run may have at once
    llm_max_output_tokens: int = 4096  # LLM_MAX_OUTPUT_TOKENS: a model call's output cap
    event_ttl_s: float = 24 * 3600.0  # INFER_EVENT_TTL: an answered CloudEvent is remembered

    def run_bound(self, threads: int | None = None) -> int:
        """Runs to take at once: INFER_MAX_RUNS, but never so many that no thread is left.

        A run holds one of the server's `threads` (gunicorn's THREADS) while its cells'
        sub-calls come back to this process as callbacks that need threads too, one per depth:
        with every thread held by a run, callbacks would queue behind runs that wait on them.
        Above the bound a run is refused with 429 and Retry-After instead.
        """
        threads = self.threads if threads is None else threads
        return max(1, min(self.max_runs, (threads - 2) // (self.max_depth + 1)))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, served: bool = True) -> InferSettings:
        """`served`: running as the infer function, so the execute URL and token key are needed."""
        e = env if env is not None else os.environ
        key = env_str("RLM_TOKEN_KEY", "" if not served else None, e)
        windows = env_str("LLM_CONTEXT_WINDOWS", "", e)
        parse_windows(windows)  # a malformed table fails at start
        if served and len(key) < 32:
            raise ConfigError("RLM_TOKEN_KEY must be at least 32 characters of secret")
        return cls(
            api_key=env_str("LLM_API_KEY", None, e),
            base_url=env_url("LLM_BASE_URL", None, e),
            model=env_str("LLM_MODEL", None, e),
            sub_model=env_str("LLM_SUB_MODEL", "", e) or None,
            llm_timeout_s=env_float("LLM_TIMEOUT", 120.0, 1, e),
            llm_max_retries=env_int("LLM_MAX_RETRIES", 4, 0, e),
            llm_timeout_retries=env_int("LLM_TIMEOUT_RETRIES", 1, 0, e),
            prices_json=env_str("LLM_PRICES", "", e),
            execute_url=env_url("WASM_SERVICE_URL", None, e) if served else "",
            callback_url=env_url("INFER_CALLBACK_URL", "http://127.0.0.1:8080", e),
            token_key=key.encode(),
            max_depth=env_int("MAX_DEPTH", 1, 0, e),
            max_iterations=env_int("MAX_ITERATIONS", 30, 1, e),
            cell_timeout_s=env_float("INFER_CELL_TIMEOUT", 300.0, 0.001, e),
            max_runs=env_int("INFER_MAX_RUNS", 32, 1, e),
            subcall_concurrency=env_int("INFER_SUBCALL_CONCURRENCY", 32, 1, e),
            max_context_bytes=env_int("INFER_MAX_CONTEXT_MB", 256, 1, e) * MIB,
            output_chars=env_int("INFER_OUTPUT_CHARS", 20_000, 100, e),
            sink_url=env_url("K_SINK", "", e) if e.get("K_SINK") else "",
            # embedded, a conversation lasts as long as the process that holds it
            conversation_ttl_s=env_float(
                "INFER_CONVERSATION_TTL", 3600.0 if served else math.inf, 0.001, e
            ),
            conversation_max_bytes=int(
                env_float("INFER_CONVERSATION_MAX_MB", 512, 0.000001, e) * MIB
            ),
            compaction_threshold=_fraction("RLM_COMPACTION_THRESHOLD", 0.85, e),
            context_windows_json=windows,
            endpoints=parse_endpoints(e.get("RLM_ENDPOINTS", ""), e),
            tool_url_prefixes=_prefixes(e.get("RLM_TOOL_URL_PREFIXES", "")),
            context_url_prefixes=_prefixes(e.get("INFER_CONTEXT_URL_PREFIXES", "")),
            threads=env_int("THREADS", 4 * (os.cpu_count() or 1), 1, e),
            store_url=_store_url(e),
            store_password=env_str("INFER_STORE_PASSWORD", "", e),
            cell_subcalls=env_int("INFER_CELL_SUBCALLS", 1000, 0, e),
            max_children=env_int("INFER_MAX_CHILDREN", 8, 0, e),
            llm_max_output_tokens=env_int("LLM_MAX_OUTPUT_TOKENS", 4096, 1, e),
            event_ttl_s=env_float("INFER_EVENT_TTL", 24 * 3600.0, 1, e),
        )

    @property
    def context_windows(self) -> dict[str, int]:
        return parse_windows(self.context_windows_json)


def _fraction(name: str, default: float, env: Mapping[str, str]) -> float:
    value = env_float(name, default, 0.01, env)
    if value >= 1:
        raise ConfigError(f"{name}={value} must be below 1 (a fraction of the context window)")
    return value


def _store_url(env: Mapping[str, str]) -> str:
    url = env_str("INFER_STORE_URL", "", env)
    if url and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"INFER_STORE_URL={url!r} must be a redis://, rediss:// or unix:// URL")
    return url


def _prefixes(text: str) -> tuple[str, ...]:
    """A comma-separated list of URL prefixes."""
    return tuple(p.strip() for p in text.split(",") if p.strip())

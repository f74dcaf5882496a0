"""The infer plane's settings, read once from the environment at start."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from functions import urls
from functions.config import ConfigError, env_bool, env_float, env_int, env_str, env_url
from functions.infer.compaction import parse_windows
from functions.infer.pricing import PriceTable
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
    "INFER_AUTH",
    "INFER_API_KEYS",
    "INFER_API_KEYS_FILE",
    "INFER_METRICS_CIDRS",
    "INFER_MAX_BUDGET_USD",
    "INFER_DEFAULT_BUDGET_USD",
    "INFER_MAX_TIMEOUT",
    "INFER_MODELS",
    "INFER_ALLOW_UNPRICED",
    "INFER_STORE_URL",
    "INFER_STORE_PASSWORD",
    "INFER_CELL_SUBCALLS",
    "INFER_MAX_CHILDREN",
    "LLM_MAX_OUTPUT_TOKENS",
    "INFER_EVENT_TTL",
    "INFER_READ_TIMEOUT",
    "INFER_MAX_HEADER_KB",
    "INFER_MAX_SCHEMA_KB",
    "INFER_SCHEMA_REPAIRS",
    "RLM_MCP_FILE_ROOTS",
)
AUTH_MODES = ("keys", "none")
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
    # Who may call, and the most a request may ask for. The defaults here are the embedded
    # mode's (its caller is the operator); `from_env(served=True)` gives the served ones.
    auth: str = "keys"  # INFER_AUTH: "keys" (callers send an API key) or "none" (local mode)
    api_keys_json: str = ""  # INFER_API_KEYS: the callers' keys as JSON (callers.py)
    api_keys_file: str = ""  # INFER_API_KEYS_FILE: the same, in a file (a mounted Secret)
    metrics_cidrs: tuple[str, ...] = ()  # INFER_METRICS_CIDRS: peers reading /metrics keyless
    max_budget_usd: float | None = None  # INFER_MAX_BUDGET_USD: the most a request may ask
    default_budget_usd: float | None = None  # INFER_DEFAULT_BUDGET_USD: when it asks none
    max_timeout_s: float | None = None  # INFER_MAX_TIMEOUT: the most, and the default
    models: tuple[str, ...] | None = None  # INFER_MODELS: models a request may name; None: any
    allow_unpriced: bool = True  # INFER_ALLOW_UNPRICED: models with no price may run
    store_url: str = ""  # INFER_STORE_URL: redis://… the run ledger; empty: in this process
    store_password: str = ""  # INFER_STORE_PASSWORD: the ledger's password (from a Secret)
    cell_subcalls: int = 1000  # INFER_CELL_SUBCALLS: sub-call prompts and tool calls per cell
    max_children: int = 8  # INFER_MAX_CHILDREN: child RLMs one run may have at once
    llm_max_output_tokens: int = 4096  # LLM_MAX_OUTPUT_TOKENS: a model call's output cap
    event_ttl_s: float = 24 * 3600.0  # INFER_EVENT_TTL: an answered CloudEvent is remembered
    read_timeout_s: float = 120.0  # INFER_READ_TIMEOUT: a whole request must arrive within it
    max_header_bytes: int = 64 << 10  # INFER_MAX_HEADER_KB: request line and headers
    max_schema_bytes: int = 64 * 1024  # INFER_MAX_SCHEMA_KB: an output_schema, a tool's parameters
    schema_repairs: int = 1  # INFER_SCHEMA_REPAIRS: turns to fix an answer that misses its schema
    mcp_file_roots: tuple[str, ...] = ()  # RLM_MCP_FILE_ROOTS: where `rlm mcp` reads files; ()=cwd

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
        settings = cls(
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
            tool_url_prefixes=_prefixes("RLM_TOOL_URL_PREFIXES", e),
            context_url_prefixes=_prefixes("INFER_CONTEXT_URL_PREFIXES", e),
            threads=env_int("THREADS", 4 * (os.cpu_count() or 1), 1, e),
            store_url=_store_url(e),
            store_password=env_str("INFER_STORE_PASSWORD", "", e),
            cell_subcalls=env_int("INFER_CELL_SUBCALLS", 1000, 0, e),
            max_children=env_int("INFER_MAX_CHILDREN", 8, 0, e),
            llm_max_output_tokens=env_int("LLM_MAX_OUTPUT_TOKENS", 4096, 1, e),
            event_ttl_s=env_float("INFER_EVENT_TTL", 24 * 3600.0, 1, e),
            read_timeout_s=env_float("INFER_READ_TIMEOUT", 120.0, 1, e),
            max_header_bytes=env_int("INFER_MAX_HEADER_KB", 64, 8, e) << 10,
            max_schema_bytes=env_int("INFER_MAX_SCHEMA_KB", 64, 1, e) * 1024,
            schema_repairs=env_int("INFER_SCHEMA_REPAIRS", 1, 0, e),
            mcp_file_roots=_items(e.get("RLM_MCP_FILE_ROOTS", "")),
        )
        return settings._with_ceilings(e) if served else settings

    def _with_ceilings(self, e: Mapping[str, str]) -> InferSettings:
        """The served function's caller settings and ceilings, checked against each other."""
        auth = env_str("INFER_AUTH", "keys", e).lower()
        if auth not in AUTH_MODES:
            raise ConfigError(f"INFER_AUTH={auth!r} must be one of {', '.join(AUTH_MODES)}")
        keys_json, keys_file = (
            env_str("INFER_API_KEYS", "", e),
            env_str("INFER_API_KEYS_FILE", "", e),
        )
        if auth == "keys" and not (keys_json or keys_file):
            raise ConfigError(
                "no API keys: set INFER_API_KEYS_FILE (or INFER_API_KEYS) to the callers' keys "
                "(docs/deploy.md), or INFER_AUTH=none for a local server anyone who reaches it "
                "may use"
            )
        if auth == "none" and (keys_json or keys_file):
            raise ConfigError("INFER_AUTH=none and API keys are both set: choose one")
        max_budget = env_float("INFER_MAX_BUDGET_USD", 10.0, 0.000001, e)
        default_budget = env_float("INFER_DEFAULT_BUDGET_USD", 1.0, 0.000001, e)
        if default_budget > max_budget:
            raise ConfigError(
                f"INFER_DEFAULT_BUDGET_USD={default_budget} is above "
                f"INFER_MAX_BUDGET_USD={max_budget}"
            )
        models_text = env_str("INFER_MODELS", "", e)
        if models_text == "*":
            models = None
        elif models_text:
            models = tuple(dict.fromkeys(m.strip() for m in models_text.split(",") if m.strip()))
        else:  # the models the operator configured, and no others
            configured = [self.model, self.sub_model]
            configured += [m for endpoint in self.endpoints.values() for m in endpoint.models]
            models = tuple(dict.fromkeys(m for m in configured if m))
        allow_unpriced = env_bool("INFER_ALLOW_UNPRICED", auth == "none", e)
        if not allow_unpriced:
            prices = PriceTable(self.prices_json)
            for name, model in (("LLM_MODEL", self.model), ("LLM_SUB_MODEL", self.sub_model)):
                if model and prices.price(model) is None:
                    raise ConfigError(
                        f"{name}={model} has no price, so no budget would bound it: add it to "
                        "LLM_PRICES, or set INFER_ALLOW_UNPRICED=true"
                    )
        return dataclasses.replace(
            self,
            auth=auth,
            api_keys_json=keys_json,
            api_keys_file=keys_file,
            metrics_cidrs=_networks("INFER_METRICS_CIDRS", e),
            max_budget_usd=max_budget,
            default_budget_usd=default_budget,
            max_timeout_s=env_float("INFER_MAX_TIMEOUT", 3600.0, 1, e),
            models=models,
            allow_unpriced=allow_unpriced,
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


def _items(text: str) -> tuple[str, ...]:
    """A comma-separated list."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _prefixes(name: str, env: Mapping[str, str]) -> tuple[str, ...]:
    """A comma-separated list of URL prefixes, each checked (`functions.urls`)."""
    return tuple(p.text for p in urls.parse_prefixes(env.get(name, ""), name))


def _networks(name: str, env: Mapping[str, str]) -> tuple[str, ...]:
    """A comma-separated list of CIDRs."""
    found = []
    for item in (i.strip() for i in env.get(name, "").split(",")):
        if item:
            try:
                found.append(str(ipaddress.ip_network(item, strict=False)))
            except ValueError:
                raise ConfigError(f"{name}: {item!r} is not an address range (a CIDR)") from None
    return tuple(found)

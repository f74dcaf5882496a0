"""The execute plane's settings, read once from the environment at start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from functions.config import env_float, env_int, env_str
from functions.urls import parse_prefixes

MIB = 1 << 20
# The process itself, idle: the runtime, the compiled module, the spare interpreter (~150 MB
# measured by benchmarks/execute_bench.py), with room to spare.
PROCESS_BYTES = 384 * MIB

# Every variable this plane reads; the manifests are checked against this list.
ENV_NAMES = (
    "EXECUTION_TIMEOUT",
    "EXECUTE_MAX_TIMEOUT",
    "EXECUTE_FUEL",
    "EXECUTE_MEMORY_MB",
    "EXECUTE_OUTPUT_BYTES",
    "EXECUTE_MAX_REQUEST_MB",
    "EXECUTE_MAX_SUBCALLS",
    "EXECUTE_SUBCALL_TIMEOUT",
    "EXECUTE_STATE_INLINE_BYTES",
    "EXECUTE_MAX_STATE_MB",
    "EXECUTE_CACHE_MB",
    "EXECUTE_MAX_SESSIONS",
    "EXECUTE_CONCURRENCY",
    "EXECUTE_QUEUE_WAIT",
    "EXECUTE_MAX_BATCH_MB",
    "EXECUTE_READ_TIMEOUT",
    "EXECUTE_MAX_HEADER_KB",
    "EXECUTE_CALLBACK_ORIGINS",
    "WASI_PYTHON_CACHE",
)


@dataclass(frozen=True)
class ExecuteSettings:
    deadline_s: float = 30.0  # EXECUTION_TIMEOUT: a cell's default wall deadline
    max_deadline_s: float = 900.0  # EXECUTE_MAX_TIMEOUT: the most a caller may ask for
    fuel: int = 400_000_000_000  # EXECUTE_FUEL: guest instructions per cell
    memory_bytes: int = 2048 * MIB  # EXECUTE_MEMORY_MB: guest linear memory per session
    output_bytes: int = 1 * MIB  # EXECUTE_OUTPUT_BYTES: kept per stream per cell
    max_request_bytes: int = 256 * MIB  # EXECUTE_MAX_REQUEST_MB: larger bodies get 413
    max_subcalls: int = 1000  # EXECUTE_MAX_SUBCALLS: sub-call prompts per cell
    subcall_timeout_s: float = 600.0  # EXECUTE_SUBCALL_TIMEOUT: one callback request
    state_inline_bytes: int = 1 * MIB  # EXECUTE_STATE_INLINE_BYTES: state.data sent below this
    max_state_bytes: int = 512 * MIB  # EXECUTE_MAX_STATE_MB: a larger state is not kept
    cache_bytes: int = 4096 * MIB  # EXECUTE_CACHE_MB: live sessions + blobs held by the pod
    max_sessions: int = 64  # EXECUTE_MAX_SESSIONS: live interpreters held by the pod
    concurrency: int = 0  # EXECUTE_CONCURRENCY: cells at once (0: one per CPU)
    queue_wait_s: float = 2.0  # EXECUTE_QUEUE_WAIT: wait for a slot before answering 503
    max_batch_bytes: int = 64 * MIB  # EXECUTE_MAX_BATCH_MB: prompt bytes of one large batch
    read_timeout_s: float = 60.0  # EXECUTE_READ_TIMEOUT: a whole request must arrive within it
    max_header_bytes: int = 64 << 10  # EXECUTE_MAX_HEADER_KB: request line and headers
    wasm_cache_dir: str = ""  # WASI_PYTHON_CACHE: the pre-compiled module cache
    # EXECUTE_CALLBACK_ORIGINS: URL prefixes (infer's address) a cell's callback.url must be
    # under, checked by functions/urls.py; none: a cell's sub-calls are refused
    callback_origins: tuple[str, ...] = ()

    @property
    def slots(self) -> int:
        return self.concurrency or (os.cpu_count() or 1)

    def host_bytes(self, cells: int) -> int:
        """The most memory the process holds with `cells` cells in flight (running, or waiting
        on sub-calls): the process, the cache (live sessions charged their linear memory, and
        blobs), and per cell its guest and, on the host, its request (the body, its parse and a
        context's bytes), its state (inflated, and packed into the answer), a staged batch and
        its output. A pod's memory limit must cover it for the cells the pod may be sent."""
        per_cell = (
            self.memory_bytes
            + 3 * self.max_request_bytes
            + 4 * self.max_state_bytes
            + self.max_batch_bytes
            + 2 * self.output_bytes
        )
        return PROCESS_BYTES + self.cache_bytes + cells * per_cell

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ExecuteSettings:
        d = cls()
        origins = parse_prefixes(
            env_str("EXECUTE_CALLBACK_ORIGINS", "", env), "EXECUTE_CALLBACK_ORIGINS"
        )
        return cls(
            deadline_s=env_float("EXECUTION_TIMEOUT", d.deadline_s, 0.001, env),
            max_deadline_s=env_float("EXECUTE_MAX_TIMEOUT", d.max_deadline_s, 0.001, env),
            fuel=env_int("EXECUTE_FUEL", d.fuel, 1, env),
            memory_bytes=env_int("EXECUTE_MEMORY_MB", d.memory_bytes // MIB, 64, env) * MIB,
            output_bytes=env_int("EXECUTE_OUTPUT_BYTES", d.output_bytes, 1024, env),
            max_request_bytes=env_int("EXECUTE_MAX_REQUEST_MB", d.max_request_bytes // MIB, 1, env)
            * MIB,
            max_subcalls=env_int("EXECUTE_MAX_SUBCALLS", d.max_subcalls, 0, env),
            subcall_timeout_s=env_float("EXECUTE_SUBCALL_TIMEOUT", d.subcall_timeout_s, 1, env),
            state_inline_bytes=env_int("EXECUTE_STATE_INLINE_BYTES", d.state_inline_bytes, 0, env),
            max_state_bytes=env_int("EXECUTE_MAX_STATE_MB", d.max_state_bytes // MIB, 1, env) * MIB,
            cache_bytes=env_int("EXECUTE_CACHE_MB", d.cache_bytes // MIB, 16, env) * MIB,
            max_sessions=env_int("EXECUTE_MAX_SESSIONS", d.max_sessions, 1, env),
            concurrency=env_int("EXECUTE_CONCURRENCY", d.concurrency, 0, env),
            queue_wait_s=env_float("EXECUTE_QUEUE_WAIT", d.queue_wait_s, 0, env),
            max_batch_bytes=env_int("EXECUTE_MAX_BATCH_MB", d.max_batch_bytes // MIB, 1, env) * MIB,
            read_timeout_s=env_float("EXECUTE_READ_TIMEOUT", d.read_timeout_s, 1, env),
            max_header_bytes=env_int("EXECUTE_MAX_HEADER_KB", d.max_header_bytes >> 10, 8, env)
            << 10,
            wasm_cache_dir=env_str("WASI_PYTHON_CACHE", "", env),
            callback_origins=tuple(p.text for p in origins),
        )

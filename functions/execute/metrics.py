"""The execute plane's Prometheus metrics, with the names the seeds gave them."""

from __future__ import annotations

import resource

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

requests_total = Counter(
    "wasm_execution_requests_total",
    "Cells asked of this pod, by outcome",
    ["outcome"],
    registry=REGISTRY,
)
duration = Histogram(
    "wasm_execution_duration_seconds",
    "Wall time of one cell in the sandbox",
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
errors_total = Counter(
    "wasm_execution_errors_total",
    "Cells that ended in an exception or a trap",
    ["kind"],
    registry=REGISTRY,
)
timeouts_total = Counter(
    "wasm_execution_timeout_total", "Cells stopped by their deadline", registry=REGISTRY
)
memory_bytes = Gauge(
    "wasm_memory_usage_bytes", "Resident memory of this execute process", registry=REGISTRY
)
cpu_seconds = Gauge(
    "wasm_cpu_usage_seconds", "CPU time used by this execute process", registry=REGISTRY
)
live_sessions = Gauge("wasm_live_sessions", "Live interpreters held by this pod", registry=REGISTRY)


def observe_cell(elapsed: float, trapped: str | None) -> None:
    duration.observe(elapsed)
    if trapped == "deadline":
        timeouts_total.inc()
    if trapped:
        errors_total.labels(kind="trap").inc()


def refresh_process_gauges() -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds.set(usage.ru_utime + usage.ru_stime)
    memory_bytes.set(current_rss())


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

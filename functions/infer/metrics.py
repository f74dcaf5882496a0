"""The infer plane's Prometheus metrics, with the names the seeds gave them."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry()

requests_total = Counter(
    "rlm_inference_requests_total", "RLM runs asked of this process, by how they ended",
    ["status"], registry=REGISTRY,
)  # fmt: skip
duration = Histogram(
    "rlm_inference_duration_seconds", "Wall time of one RLM run",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
    registry=REGISTRY,
)  # fmt: skip
code_generated_total = Counter(
    "rlm_code_generated_total", "Code cells the root models wrote", registry=REGISTRY
)
code_execution_requests_total = Counter(
    "rlm_code_execution_requests_total", "Cells sent to the execute plane, by outcome",
    ["outcome"], registry=REGISTRY,
)  # fmt: skip
subcalls_total = Counter(
    "rlm_subcalls_total", "Sub-call prompts served for sandboxed code", ["kind"],
    registry=REGISTRY,
)  # fmt: skip
tokens_total = Counter(
    "rlm_tokens_total", "LLM tokens used, by direction", ["direction"], registry=REGISTRY
)


def observe_event(kind: str, data: dict[str, Any]) -> None:
    """Counts from the loop's progress events."""
    if kind == "code":
        code_generated_total.inc()
    elif kind == "output":
        code_execution_requests_total.labels(outcome="error" if data.get("error") else "ok").inc()

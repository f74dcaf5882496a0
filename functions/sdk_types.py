"""What the SDK hands back, shaped and named as the official `rlm` library's: the result of a
completion, its usage summary and the logger.

The official names are the fields (`root_model`, `prompt`, `response`, `usage_summary`,
`execution_time`, `metadata`, `error`); this project's own fields come after them (`status`,
`stop_code`, `stop_reason`, `usage` with per-model `ModelUsage`). A stop is a result, as on every
other surface; `raise_for_status()` raises the official library's typed error for it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from functions.contract import InferResult, ModelUsage, UsageByModel
from functions.errors import LIMIT_ERRORS, UpstreamError


@dataclass
class ModelUsageSummary:
    total_calls: int
    total_input_tokens: int
    total_output_tokens: int
    total_cost: float | None = None  # USD, from LLM_PRICES or the built-in table

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "total_calls": self.total_calls,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
        }
        if self.total_cost is not None:
            out["total_cost"] = self.total_cost
        return out

    @classmethod
    def of(cls, usage: ModelUsage) -> ModelUsageSummary:
        return cls(usage.calls, usage.input_tokens, usage.output_tokens, usage.cost_usd)


@dataclass
class UsageSummary:
    model_usage_summaries: dict[str, ModelUsageSummary]

    @property
    def total_cost(self) -> float | None:
        summaries = self.model_usage_summaries.values()
        costs = [s.total_cost for s in summaries if s.total_cost is not None]
        return sum(costs) if costs else None

    @property
    def total_input_tokens(self) -> int:
        return sum(s.total_input_tokens for s in self.model_usage_summaries.values())

    @property
    def total_output_tokens(self) -> int:
        return sum(s.total_output_tokens for s in self.model_usage_summaries.values())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model_usage_summaries": {
                model: summary.to_dict() for model, summary in self.model_usage_summaries.items()
            }
        }
        if self.total_cost is not None:
            out["total_cost"] = self.total_cost
        return out

    @classmethod
    def of(cls, usage: UsageByModel) -> UsageSummary:
        return cls({model: ModelUsageSummary.of(u) for model, u in usage.items()})


@dataclass
class RLMChatCompletion:
    """One completion. `response` is the answer; for a run that stopped (`status` "stopped")
    it is the partial answer, or None."""

    root_model: str
    prompt: Any
    response: str | None
    usage_summary: UsageSummary
    execution_time: float
    metadata: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    status: str = "completed"  # "completed", "stopped" or "failed"
    stop_code: str | None = None  # the limit that stopped the run, or that an answer came at
    stop_reason: str | None = None
    usage: UsageByModel = field(default_factory=dict)
    value: Any = None  # with output_schema: the answer parsed (an instance of a pydantic model)

    @classmethod
    def of(cls, result: InferResult, model: str, prompt: Any) -> RLMChatCompletion:
        return cls(
            root_model=model,
            prompt=prompt,
            response=result.answer,
            usage_summary=UsageSummary.of(result.usage),
            execution_time=result.execution_time,
            metadata={
                "run_id": result.run_id,
                "status": result.status,
                "stop_code": result.stop_code,
                "stop_reason": result.stop_reason,
                "error": result.error,
                "iterations": result.iterations,
                "total_cost_usd": result.total_cost_usd,
                "trajectory": result.trajectory or [],
                "conversation_id": result.conversation_id,
            },
            error=result.error,
            status=result.status,
            stop_code=result.stop_code,
            stop_reason=result.stop_reason,
            usage=result.usage,
            value=result.value,
        )

    def raise_for_status(self) -> RLMChatCompletion:
        """Raise the official library's error for a run that did not complete: the limit's
        typed error (`partial_answer` is `response`, `result` this completion) for a stop,
        `UpstreamError` for a failure. Returns the completion when it completed."""
        if self.status == "stopped" and self.stop_code in LIMIT_ERRORS:
            error = LIMIT_ERRORS[self.stop_code]  # type: ignore[index]
            raise error(self.stop_reason or self.stop_code, partial_answer=self.response,
                        result=self)  # fmt: skip
        if self.status == "failed":
            raise UpstreamError(f"the run failed: {self.error}")
        return self

    def to_dict(self) -> dict[str, Any]:
        out = {
            "root_model": self.root_model,
            "prompt": self.prompt,
            "response": self.response,
            "usage_summary": self.usage_summary.to_dict(),
            "execution_time": self.execution_time,
            "metadata": self.metadata,
        }
        if self.error is not None:
            out["error"] = self.error
        return out


class RLMLogger:
    """The official library's logger: keeps each completion's trajectory (`get_trajectory()`)
    and, with `log_dir`, appends it to one JSONL file (this project's trajectory entries, which
    `rlm view` renders)."""

    def __init__(self, log_dir: str | None = None, file_name: str = "rlm") -> None:
        self.log_file_path: str | None = None
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
            name = f"{file_name}_{stamp}_{uuid.uuid4().hex[:8]}.jsonl"
            self.log_file_path = str(Path(log_dir) / name)
        self._entries: list[dict[str, Any]] = []

    def __call__(self, entry: dict[str, Any]) -> None:
        """One trajectory entry; a root run's first entry starts a new trajectory."""
        if entry.get("kind") == "run" and entry.get("depth", 0) == 0:
            self._entries = []
        self._entries.append(entry)
        if self.log_file_path is not None:
            with open(self.log_file_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, default=str) + "\n")

    def get_trajectory(self) -> list[dict[str, Any]] | None:
        return list(self._entries) or None

"""Values read out of JSON that came from elsewhere (a trajectory file, a server's events): a
missing or mistyped value reads as empty, never as an exception."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def whole(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


def mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


@dataclass
class Used:
    """Tokens, cost and seconds."""

    tokens: int = 0
    cost: float = 0.0
    seconds: float = 0.0

    def add_usage(self, usage: Any) -> None:
        """One usage record ({input_tokens, output_tokens, cost_usd}) or one per model."""
        usage = mapping(usage)
        records = [usage] if "input_tokens" in usage else list(usage.values())
        for record in records:
            record = mapping(record)
            self.tokens += whole(record.get("input_tokens")) + whole(record.get("output_tokens"))
            self.cost += num(record.get("cost_usd"))

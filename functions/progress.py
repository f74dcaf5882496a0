"""Live progress of a run on a terminal: turn, what runs, sub-calls, tokens, cost, elapsed."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    """Receives the loop's events (kind, data); redraws one status line on a terminal, or
    writes plain lines elsewhere when `verbose`."""

    def __init__(self, stream: TextIO = sys.stderr, verbose: bool = False) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.verbose = verbose
        self.started = time.monotonic()
        self.turn = 0
        self.doing = "starting"
        self.subcalls = 0
        self.tokens = 0
        self.cost = 0.0

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if data.get("depth", 0) > 0 and kind not in ("usage",):
            return  # child runs report through their parent's usage
        if kind == "turn":
            self.turn = data.get("iteration", self.turn)
            self.doing = "asking the model"
        elif kind == "code":
            first = next((ln for ln in data.get("code", "").splitlines() if ln.strip()), "")
            self.doing = f"running: {first[:60]}"
            self._line(f"turn {self.turn}: {first[:100]}")
        elif kind == "output":
            self.subcalls += data.get("subcalls", 0)
            self.doing = "cell done" + (f" ({data['error']})" if data.get("error") else "")
        elif kind == "usage" and data.get("depth", 0) == 0:
            usage = {k: v for k, v in data.items() if isinstance(v, dict)}
            self.tokens = sum(u["input_tokens"] + u["output_tokens"] for u in usage.values())
            self.cost = sum(u["cost_usd"] for u in usage.values())
        elif kind == "final":
            self.doing = data.get("status", "done")
        self._draw()
        if kind == "final" and self.live:
            self.stream.write("\n")
            self.stream.flush()

    def status(self) -> str:
        elapsed = time.monotonic() - self.started
        return (
            f"turn {self.turn} · {self.doing} · sub-calls {self.subcalls} · "
            f"{self.tokens:,} tokens · ${self.cost:.4f} · {elapsed:.1f}s"
        )

    def _draw(self) -> None:
        if self.live:
            self.stream.write("\r\x1b[2K" + self.status()[:200])
            self.stream.flush()

    def _line(self, text: str) -> None:
        if self.live:
            self.stream.write("\r\x1b[2K" + text + "\n")
        elif self.verbose:
            self.stream.write(text + "\n")
        self.stream.flush()

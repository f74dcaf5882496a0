"""Compaction: when the root conversation nears the model's context window, summarize it.

The root model is asked for a summary of its progress (as the official `rlm` library does);
the conversation sent to it becomes the system prompt, the first user message, that summary
and a line saying to continue. Nothing is lost: the full conversation, with each summary in
place, is bound in the REPL as `history`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from functions.config import ConfigError

Message = dict[str, str]

DEFAULT_WINDOW = 128_000  # tokens, for a model found in neither the table nor LLM_CONTEXT_WINDOWS
# Input context windows in tokens; a key matches a model whose name contains it (longest wins).
DEFAULT_WINDOWS: dict[str, int] = {
    "gpt-5": 272_000,
    "gpt-4.1": 1_000_000,
    "gpt-4o": 128_000,
    "gpt-4-turbo": 128_000,
    "gpt-3.5-turbo": 16_385,
    "o1": 200_000,
    "o3": 200_000,
    "o4-mini": 200_000,
    "claude": 200_000,
    "gemini": 1_000_000,
    "qwen3": 128_000,
    "kimi": 128_000,
    "glm": 128_000,
}
CHARS_PER_TOKEN = 4
KEPT = 2  # the system prompt and the first user message stay as they are

SUMMARY_REQUEST = (
    "Summarize your progress so far. Include:\n"
    "1. Which steps of the task you have completed and which remain.\n"
    "2. Every concrete intermediate result (numbers, values, names of REPL variables that hold "
    "results), exactly.\n"
    "3. What your next action should be.\n"
    "Be brief (one to three paragraphs) but keep every key result. Do not write code."
)
SYSTEM_NOTE = (
    "\n\nWhen this conversation grows long, its earlier part is replaced by a summary. The full "
    'conversation stays in the REPL as `history`, a list of {"role", "content"} dicts.'
)


def continue_message(count: int) -> str:
    return (
        f"The conversation was compacted ({count} time{'s' if count != 1 else ''}): the summary "
        "above replaces the earlier turns. Continue from it without repeating finished work. "
        "Your REPL variables are all still there (SHOW_VARS() lists them) and the full "
        "conversation is in `history`. Your next step:"
    )


def text_tokens(text: str) -> int:
    """A model's token count for `text`, estimated where the server reports none."""
    return len(text) // CHARS_PER_TOKEN + 1


def estimate_tokens(messages: list[Message]) -> int:
    """About how many tokens `messages` take: four characters a token, plus a few per message."""
    return sum(text_tokens(m.get("content") or "") + 3 for m in messages)


def context_window(model: str, windows: Mapping[str, int]) -> int:
    """The input window of `model`: exact name, else the longest key its name contains."""
    table = {**DEFAULT_WINDOWS, **windows}
    if model in table:
        return table[model]
    name = model.lower()
    matches = [key for key in table if key.lower() in name]
    return table[max(matches, key=len)] if matches else DEFAULT_WINDOW


def parse_windows(text: str) -> dict[str, int]:
    """LLM_CONTEXT_WINDOWS: {"model": tokens, ...}; ConfigError if malformed."""
    expected = 'expected {"model": tokens, ...}'
    try:
        raw = json.loads(text) if text.strip() else {}
    except ValueError:
        raise ConfigError(f"LLM_CONTEXT_WINDOWS is not JSON: {expected}") from None
    if not isinstance(raw, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in raw.values()
    ):
        raise ConfigError(f"LLM_CONTEXT_WINDOWS must map models to whole numbers > 0: {expected}")
    return raw


@dataclass
class Compactor:
    """Decides when to compact, rewrites the message list, and keeps the full conversation."""

    window_tokens: int
    threshold: float = 0.85
    count: int = 0
    archive: list[Message] = field(default_factory=list)  # compacted messages and summaries

    @property
    def limit_tokens(self) -> int:
        return int(self.window_tokens * self.threshold)

    def due(self, messages: list[Message]) -> bool:
        """At or over the threshold, and something new since the last compaction."""
        fresh = len(messages) > self._prefix()
        return fresh and estimate_tokens(messages) >= self.limit_tokens

    def summary_request(self, messages: list[Message]) -> list[Message]:
        return [*messages, {"role": "user", "content": SUMMARY_REQUEST}]

    def compact(self, messages: list[Message], summary: str) -> None:
        """Replace all but the first messages with `summary` (in place); archive what went."""
        if self.count == 0:
            self.archive.extend(messages)
        else:
            self.archive.extend(messages[self._prefix() :])
        self.count += 1
        self.archive.append({"role": "assistant", "content": f"[summary {self.count}]\n{summary}"})
        messages[:] = [
            *messages[:KEPT],
            {"role": "assistant", "content": summary},
            {"role": "user", "content": continue_message(self.count)},
        ]

    def full_history(self, messages: list[Message]) -> list[Message]:
        """The whole conversation so far: archived messages, summaries, then the live tail."""
        if self.count == 0:
            return list(messages)
        return [*self.archive, *messages[self._prefix() :]]

    def _prefix(self) -> int:
        """Messages at the start of the live list that are already archived or synthetic."""
        return KEPT + 2 if self.count else KEPT

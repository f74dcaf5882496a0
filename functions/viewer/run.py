"""A trajectory read as runs made of turns: what the page shows, computed once.

A trajectory is whatever a file held, so every field is read defensively: a missing or
mistyped value shows as missing, never as an exception.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from functions.reading import Used, items, mapping, num, text, whole


def load_trajectory(path: Path) -> list[dict[str, Any]]:
    """The entries of a JSONL trajectory; `ValueError` naming the line that is not one."""
    entries = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError("it is not UTF-8 text") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            raise ValueError(f"line {number} is not JSON") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("kind"), str):
            raise ValueError(f"line {number} is not an entry (an object with a 'kind')")
        entries.append(entry)
    if not entries:
        raise ValueError("it holds no entries")
    return entries


@dataclass
class SubCall:
    kind: str  # llm, rlm, tool
    model: str
    depth: int
    prompt: str
    response: str
    child: Run | None  # the child RLM a `rlm_query` ran


@dataclass
class Cell:
    entry: dict[str, Any]
    subcalls: list[SubCall] = field(default_factory=list)

    @property
    def code(self) -> str:
        return text(self.entry.get("code"))

    @property
    def error(self) -> str:
        error = mapping(self.entry.get("error"))
        return text(error.get("traceback") or error.get("message"))

    @property
    def answered(self) -> bool:
        return bool(mapping(self.entry.get("answer")).get("ready"))


@dataclass
class Turn:
    number: int
    reply: dict[str, Any] | None = None  # the `llm` entry
    cells: list[Cell] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)  # compactions
    final: bool = False  # the run's answer came in this turn
    stopped: bool = False  # the run stopped in this turn

    @property
    def used(self) -> Used:
        used = Used()
        if self.reply is not None:
            used.add_usage(self.reply.get("usage"))
            used.seconds += num(self.reply.get("seconds"))
        for cell in self.cells:
            used.add_usage(mapping(cell.entry.get("subcalls")).get("usage"))
            used.seconds += num(cell.entry.get("seconds"))
        for note in self.notes:
            call = mapping(note.get("summary_call"))
            used.add_usage(call.get("usage"))
            used.seconds += num(call.get("seconds"))
        return used

    @property
    def badges(self) -> list[str]:
        found = []
        if self.final:
            found.append("answer")
        if any(c.error for c in self.cells):
            found.append("error")
        if self.stopped:
            found.append("stopped")
        if any(s.child is not None for c in self.cells for s in c.subcalls):
            found.append("child")
        if self.notes:
            found.append("compaction")
        if self.reply is not None and self.reply.get("final_request"):
            found.append("final-request")
        if self.reply is not None and self.reply.get("finish_reason") == "length":
            found.append("cut-off")
        return found

    @property
    def subcall_count(self) -> int:
        return sum(len(c.subcalls) for c in self.cells)


LIMITS = (("max_iterations", "{:,.0f} turns"), ("max_depth", "depth {:.0f}"),
          ("max_budget_usd", "${:,.2f}"), ("max_tokens", "{:,.0f} tokens"),
          ("max_timeout_s", "{:,.0f} s"), ("max_errors", "{:.0f} errors"))  # fmt: skip


@dataclass
class Outcome:
    kind: str  # completed, forced, stopped, failed, unfinished
    title: str
    detail: str
    answer: str | None


@dataclass
class Run:
    run_id: str
    depth: int
    start: dict[str, Any] | None  # the `run` entry: query, system_prompt, first message, model
    turns: list[Turn]
    final: dict[str, Any] | None

    @property
    def question(self) -> str | None:
        return text(self.start.get("query")) or None if self.start else None

    @property
    def model(self) -> str:
        if self.start and self.start.get("model"):
            return text(self.start["model"])
        return next((text(t.reply.get("model")) for t in self.turns if t.reply), "")

    @property
    def limits(self) -> str:
        """The limits the run was given, as its `run` entry records them."""
        start = self.start or {}
        shown = []
        for name, form in LIMITS:
            value = start.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                shown.append(form.format(value))
        return " · ".join(shown)

    @property
    def sub_models(self) -> list[str]:
        seen = {f"{s.model}" for t in self.turns for c in t.cells for s in c.subcalls}
        return sorted(m for m in seen if m)

    @property
    def used(self) -> Used:
        total = Used()
        if self.final is not None:
            total.add_usage(self.final.get("usage"))
            total.seconds = num(self.final.get("execution_time"))
            return total
        for turn in self.turns:
            used = turn.used
            total.tokens += used.tokens
            total.cost += used.cost
            total.seconds += used.seconds
        return total

    @property
    def subcall_count(self) -> int:
        return sum(t.subcall_count for t in self.turns)

    @property
    def outcome(self) -> Outcome:
        final = self.final
        if final is None:
            return Outcome("unfinished", "Unfinished",
                           "the trajectory ends before the run did", None)  # fmt: skip
        status = text(final.get("status"))
        code = text(final.get("stop_code"))
        reason = text(final.get("stop_reason"))
        reason = "" if reason == code else reason
        answer = final.get("answer")
        answer = None if answer is None else text(answer)
        if status == "completed" and not code:
            return Outcome("completed", "Completed", "", answer)
        if status == "completed":  # an answer, but only when the run was made to give one
            how = "Answered in the final request" if final.get("final_request") else "Completed"
            return Outcome("forced", f"{how} · {code}", reason, answer)
        if status == "stopped":
            return Outcome("stopped", f"Stopped · {code or 'stopped'}", reason, answer)
        why = text(final.get("error")) or reason
        return Outcome("failed", f"Failed{f' · {code}' if code else ''}", why, answer)


def runs_of(entries: list[dict[str, Any]]) -> list[Run]:
    """The trajectory's root runs, in order (a persistent SDK's log holds one per question)."""
    roots: dict[str, list[dict[str, Any]]] = {}
    depth_of = min((whole(e.get("depth")) for e in entries), default=0)
    for entry in entries:
        if whole(entry.get("depth")) == depth_of:
            roots.setdefault(text(entry.get("run_id")), []).append(entry)
    return [_run(run_id, group) for run_id, group in roots.items()]


def _run(run_id: str, entries: list[dict[str, Any]]) -> Run:
    start, final = None, None
    turns: dict[int, Turn] = {}

    def turn(entry: dict[str, Any]) -> Turn:
        number = whole(entry.get("iteration")) or (max(turns) if turns else 1)
        return turns.setdefault(number, Turn(number))

    for entry in entries:
        kind = entry.get("kind")
        if kind == "run":
            start = entry
        elif kind == "llm":
            found = turn(entry)
            if found.reply is not None:  # not expected: keep it as a turn of its own
                found = turns.setdefault(max(turns) + 1, Turn(max(turns) + 1))
            found.reply = entry
        elif kind == "cell":
            turn(entry).cells.append(Cell(entry, _subcalls(entry.get("subcall_log"))))
        elif kind == "compaction":
            found = turn(entry)
            if found.reply is not None and not found.cells:  # that reply was the summary
                entry = {**entry, "summary_call": found.reply}
                found.reply = None
            found.notes.append(entry)
        elif kind == "final":
            final = entry
    ordered = [turns[n] for n in sorted(turns)]
    if ordered and final is not None:
        last = ordered[-1]
        status = text(final.get("status"))
        answered = final.get("answer") is not None and status == "completed"
        last.final = answered or any(c.answered for c in last.cells)
        last.stopped = status in ("stopped", "failed") or bool(final.get("stop_code"))
    depth = whole(entries[0].get("depth")) if entries else 0
    return Run(run_id, depth, start, ordered, final)


def _subcalls(log: Any) -> list[SubCall]:
    found = []
    for group in items(log):
        group = mapping(group)
        for call in items(group.get("calls")):
            call = mapping(call)
            child_entries = [e for e in items(call.get("trajectory")) if isinstance(e, dict)]
            children = runs_of(child_entries) if child_entries else []
            found.append(
                SubCall(
                    kind=text(group.get("kind")) or "llm",
                    model=text(group.get("model")),
                    depth=whole(group.get("depth")),
                    prompt=text(call.get("prompt")),
                    response=text(call.get("response")),
                    child=children[0] if children else None,
                )
            )
    return found

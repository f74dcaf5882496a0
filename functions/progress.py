"""A run as it happens, followed from the loop's progress events.

On a terminal a live panel (rich) ticks: the clock, the turn, the model's reply, the running
cell, sub-calls done/total as they complete, tokens and cost; finished cells scroll above it,
and so do warnings. `verbose` prints the whole run instead of one line a cell: each reply, code
with its output and errors, sub-call prompts and answers, and a summary table at the end. Off a
terminal the same things are plain lines, without control codes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from functions.infer.parsing import segments
from functions.reading import Used, mapping, num, text, whole

T = TypeVar("T")

PREVIEW = 160  # characters of a sub-call's prompt or answer on one line
REPLY_LINES = 40  # lines of a reply, and of a cell's output, in verbose mode
LIVE_RATE = 4  # redraws a second
PANEL_WIDTH = 100  # the live panel's most columns


@dataclass
class _Run:
    """What the events have said so far."""

    started: float = field(default_factory=time.monotonic)
    turn: int = 0
    doing: str = "starting"
    since: float = field(default_factory=time.monotonic)  # when `doing` began
    reply: str = ""
    code: str = ""
    cells: int = 0  # this turn's cells so far
    cell_started: float = 0.0
    batch_done: int = 0  # the running cell's sub-calls: done (any depth) ...
    batch_total: int = 0  # ... and asked for
    subcalls: int = 0  # finished in the whole run, at any depth
    root_subcalls: int = 0  # the root's cells' sub-calls, as their `output` events count them
    tokens: int = 0
    cost: float = 0.0
    pending_tokens: int = 0  # the root's sub-calls finished since the last `usage` event
    pending_cost: float = 0.0
    final: dict[str, Any] | None = None

    def now_doing(self, what: str) -> None:
        self.doing, self.since = what, time.monotonic()


class Progress:
    """Receives the loop's events `(kind, data)` (thread-safe) and shows the run on `stream`.

    Use it as a context manager around the run: on a terminal that starts the live panel and
    shows warnings logged under `rlm` above it.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        verbose: bool = False,
        header: dict[str, str] | None = None,
        console: Console | None = None,
    ) -> None:
        self.console = console or make_console(stream)
        self.live = self.console.is_terminal and not self.console.is_dumb_terminal
        self.verbose = verbose
        self.header = header or {}
        self.state = _Run()
        self._lock = threading.RLock()
        self._live: Live | None = None
        self._warnings: contextlib.ExitStack | None = None

    # ----------------------------------------------------------------- lifetime

    def __enter__(self) -> Progress:
        self.state = _Run()
        if self.verbose and self.header:
            self._print(self._header())
        if self.live:
            self._live = Live(self, console=self.console, refresh_per_second=LIVE_RATE,
                              transient=True)  # fmt: skip
            self._live.start()
        self._warnings = contextlib.ExitStack()
        self._warnings.enter_context(warnings_to(self.warn))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._warnings is not None:
            self._warnings.close()
            self._warnings = None
        if self._live is not None:
            self._live.stop()
            self._live = None

    # ----------------------------------------------------------------- events

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        handle = getattr(self, f"_on_{kind}", None)
        if handle is None:
            return
        # The state changes under this lock, and the live panel reads it under the same one
        # (from rich's refresh thread, which holds rich's own locks): so nothing here calls
        # into rich while holding it.
        data = mapping(data)  # a deployed infer's events are a server's JSON: read with care
        with self._lock:
            shown = handle(data)
            finished = kind == "final" and self.state.final is not None
        live = self._live
        if finished and live is not None:
            self._live = None
            live.stop()
        for renderable in shown:
            self.console.print(renderable)
        if live is not None and not finished:
            live.refresh()

    def warn(self, message: str) -> None:
        self.console.print(Text(f"warning: {message}", style="yellow"))

    def _on_turn(self, data: dict[str, Any]) -> list[RenderableType]:
        out: list[RenderableType] = []
        if whole(data.get("depth")):
            return out
        s = self.state
        s.turn = whole(data.get("iteration")) or s.turn + 1
        s.reply, s.code, s.cells = "", "", 0
        s.now_doing("waiting for the model")
        return out

    def _on_reply(self, data: dict[str, Any]) -> list[RenderableType]:
        out: list[RenderableType] = []
        if whole(data.get("depth")):
            return out
        s = self.state
        s.reply = text(data.get("text")) or f"({whole(data.get('chars')):,} characters)"
        s.now_doing("read the reply")
        if self.verbose:
            out.append(self._reply_panel(s.turn, s.reply))
        return out

    def _on_code(self, data: dict[str, Any]) -> list[RenderableType]:
        out: list[RenderableType] = []
        if whole(data.get("depth")):
            return out
        s = self.state
        s.code, s.batch_done, s.batch_total = text(data.get("code")), 0, 0
        s.cells += 1
        s.cell_started = time.monotonic()
        s.now_doing("running the cell")
        if self.verbose:
            out.append(self._code_panel(s.turn, s.cells, s.code))
        elif not self.live:
            out.append(Text(f"turn {s.turn}: running: {_first_line(s.code, 100)}"))
        return out

    def _on_subcalls(self, data: dict[str, Any]) -> list[RenderableType]:
        out: list[RenderableType] = []
        s = self.state
        s.batch_total += whole(data.get("total"))
        s.now_doing("waiting for sub-calls")
        return out

    def _on_subcall(self, data: dict[str, Any]) -> list[RenderableType]:
        out: list[RenderableType] = []
        s = self.state
        s.batch_done += 1
        s.subcalls += 1
        if not whole(data.get("depth")):
            used = Used()
            used.add_usage(mapping(data.get("usage")))
            s.pending_tokens += used.tokens
            s.pending_cost += used.cost
        if self.verbose:
            out.append(self._subcall_lines(data))
        return out

    def _on_output(self, data: dict[str, Any]) -> list[RenderableType]:
        out: list[RenderableType] = []
        if whole(data.get("depth")):
            return out
        s = self.state
        s.root_subcalls += whole(data.get("subcalls"))
        s.now_doing("cell done")
        if self.verbose:
            out.append(self._output_panel(data))
        else:
            out.append(self._cell_line(data))
        return out

    def _on_usage(self, data: dict[str, Any]) -> list[RenderableType]:
        out: list[RenderableType] = []
        if whole(data.get("depth")):
            return out
        total = Used()
        total.add_usage({k: v for k, v in data.items() if isinstance(v, dict)})
        s = self.state
        s.tokens, s.cost = total.tokens, total.cost
        s.pending_tokens, s.pending_cost = 0, 0.0
        return out

    def _on_compaction(self, data: dict[str, Any]) -> list[RenderableType]:
        out: list[RenderableType] = []
        if whole(data.get("depth")):
            return out
        out.append(Text(
            f"turn {whole(data.get('iteration'))}: the conversation was summarized "
            f"({whole(data.get('tokens_before')):,} → {whole(data.get('tokens_after')):,} tokens)",
            style="magenta",
        ))  # fmt: skip
        return out

    def _on_final(self, data: dict[str, Any]) -> list[RenderableType]:
        out: list[RenderableType] = []
        if whole(data.get("depth")):
            return out
        s = self.state
        s.final = data
        s.now_doing(text(data.get("status")) or "done")
        if self.verbose:
            out.append(self._summary(data))
        out.append(self.outcome(data))
        return out

    # ----------------------------------------------------------------- pieces

    def outcome(self, final: dict[str, Any]) -> Text:
        """One line: how the run ended and what it used."""
        status = text(final.get("status")) or "unknown"
        code = text(final.get("stop_code"))
        mark, style = {"completed": ("✔", "green"), "stopped": ("■", "yellow")}.get(
            status, ("✘", "red")
        )
        if status == "completed" and code:  # answered, but only when made to (the turn limit)
            mark, style = "⚑", "yellow"
        head = status if not code else f"{status} ({code})"
        parts = [
            _plural(whole(final.get("iterations")) or self.state.turn, "turn"),
            _plural(self._subcall_count(), "sub-call"),
            f"{whole(final.get('total_tokens')):,} tokens",
            f"${num(final.get('total_cost_usd')):.4f}",
            f"{num(final.get('execution_time')):.1f} s",
        ]
        line = Text(f"{mark} {head}", style=f"bold {style}")
        line.append(" · " + " · ".join(parts))
        why = text(final.get("stop_reason")) or text(final.get("error"))
        if why and (status != "completed" or code):
            line.append(f"\n  {why}", style=style)
        return line

    def _subcall_count(self) -> int:
        s = self.state
        return max(s.subcalls, s.root_subcalls)

    def __rich__(self) -> RenderableType:
        """The live panel, drawn again at every refresh (so the clock ticks)."""
        with self._lock:
            s = self.state
            now = time.monotonic()
            top = Table.grid(padding=(0, 1), expand=True)
            top.add_column(width=1)
            top.add_column(ratio=1, overflow="ellipsis", no_wrap=True)
            top.add_column(justify="right", no_wrap=True)
            title = f"turn {s.turn}" if s.turn else "starting"
            top.add_row(
                Spinner("dots", style="cyan"),
                Text(f"{title} · {s.doing} {_clock(now - s.since)}", style="bold"),
                Text(_clock(now - s.started), style="bold cyan"),
            )
            grid = Table.grid(padding=(0, 1), expand=True)
            grid.add_column(style="dim", width=9, no_wrap=True)
            grid.add_column(ratio=1, overflow="ellipsis", no_wrap=True)
            if s.reply:
                grid.add_row("reply", Text(_prose(s.reply)))
            if s.code and s.doing != "waiting for the model":
                lines = s.code.count("\n") + (not s.code.endswith("\n"))
                more = f"  (+{lines - 1} lines)" if lines > 1 else ""
                grid.add_row("cell", Text(_first_line(s.code, 200) + more))
            if s.batch_total:
                bar = Table.grid(padding=(0, 1))
                bar.add_column(width=30)
                bar.add_column()
                bar.add_row(
                    ProgressBar(total=s.batch_total, completed=s.batch_done, width=30),
                    f"{s.batch_done}/{s.batch_total}",
                )
                grid.add_row("sub-calls", bar)
            tokens, cost = s.tokens + s.pending_tokens, s.cost + s.pending_cost
            used = f"{tokens:,} tokens · ${cost:.4f} · {_plural(self._subcall_count(), 'sub-call')}"
            grid.add_row("used", Text(used))
            return Panel(Group(top, grid), box=box.ROUNDED, border_style="cyan", padding=(0, 1),
                         width=min(self.console.width, PANEL_WIDTH))  # fmt: skip

    def _header(self) -> RenderableType:
        if not self.live:
            return Text(" · ".join(f"{k}: {v}" for k, v in self.header.items()))
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim")
        grid.add_column()
        for key, value in self.header.items():
            grid.add_row(key, str(value))
        return Panel(grid, title="rlm", title_align="left", border_style="blue", expand=False)

    def _reply_panel(self, turn: int, reply: str) -> RenderableType:
        text = Text()
        cell = 0
        for segment in segments(reply):
            if segment.runs:
                cell += 1
                text.append(f"[cell {cell}, below]\n", style="dim italic")
            elif segment.fenced:
                text.append(segment.text, style="dim")
            else:
                text.append(segment.text)
        text.rstrip()  # in place
        text = _clip_lines(text or Text("(an empty reply)", style="dim"), REPLY_LINES)
        if not self.live:
            return Group(Text(f"── turn {turn} · reply", style="bold"), text)
        return Panel(text, title=f"turn {turn} · reply", title_align="left", border_style="blue")

    def _code_panel(self, turn: int, cell: int, code: str) -> RenderableType:
        if not self.live:
            return Group(Text(f"── turn {turn} · cell {cell}"), Text(_indent(code.rstrip())))
        syntax = Syntax(code.rstrip(), "python", theme="monokai", word_wrap=True)
        return Panel(syntax, title=f"turn {turn} · cell {cell}", title_align="left",
                     border_style="magenta")  # fmt: skip

    def _output_panel(self, data: dict[str, Any]) -> RenderableType:
        out = Text(text(data.get("stdout")))
        error = text(data.get("stderr")) or text(data.get("error"))
        if error:
            out.append(error, style="red")
        out.rstrip()  # in place
        if not out:
            out = Text("(printed nothing)", style="dim")
        out = _clip_lines(out, REPLY_LINES, keep="end")
        title = "error" if data.get("error") else "output"
        subs = whole(data.get("subcalls"))
        if subs:
            title += " · " + _plural(subs, "sub-call")
        if not self.live:
            return Group(Text(f"── {title}"), Text(_indent(out.plain)))
        return Panel(out, title=title, title_align="left",
                     border_style="red" if data.get("error") else "green")  # fmt: skip

    def _subcall_lines(self, data: dict[str, Any]) -> Text:
        kind = text(data.get("kind")) or "llm"
        done, total = whole(data.get("done")), whole(data.get("total"))
        head = Text(f"  ↳ {kind}_query {done}/{total}", style="cyan")
        head.append(f" · {text(data.get('model'))}", style="dim")
        if whole(data.get("depth")):
            head.append(f" · depth {whole(data.get('depth'))}", style="dim")
        head.append(f" · {num(data.get('seconds')):.2f} s", style="dim")
        room = max(40, min(PREVIEW, self.console.width - 13))
        head.append("\n    prompt  ", style="dim")
        head.append(_one_line(text(data.get("prompt")), room))
        head.append("\n    answer  ", style="dim")
        head.append(_one_line(text(data.get("response")), room), style="bold")
        return head

    def _cell_line(self, data: dict[str, Any]) -> Text:
        s = self.state
        seconds = time.monotonic() - s.cell_started
        subs = whole(data.get("subcalls"))
        line = Text(f"turn {s.turn}: ", style="bold")
        if data.get("error"):
            line.append("cell failed: ", style="red")
            line.append(_one_line(text(data.get("error")), 120), style="red")
        else:
            printed = text(data.get("stdout")).strip()
            line.append(f"cell done in {seconds:.1f} s")
            if printed:
                line.append(": ")
                line.append(_one_line(printed.splitlines()[-1], 100), style="dim")
        if subs:
            line.append(" · " + _plural(subs, "sub-call"), style="cyan")
        return line

    def _summary(self, final: dict[str, Any]) -> RenderableType:
        table = Table(box=box.SIMPLE_HEAD if self.live else None, show_footer=True,
                      title="usage" if self.live else None)  # fmt: skip
        usage = {text(m): mapping(u) for m, u in mapping(final.get("usage")).items()}
        columns = ("calls", "input_tokens", "output_tokens")
        totals = [sum(whole(u.get(k)) for u in usage.values()) for k in columns]
        cost = sum(num(u.get("cost_usd")) for u in usage.values())
        table.add_column("model", footer="total")
        for name, total in zip(("calls", "input", "output"), totals, strict=True):
            table.add_column(name, justify="right", footer=f"{total:,}")
        table.add_column("cost", justify="right", footer=f"${cost:.4f}")
        for model, u in usage.items():
            counts = [f"{whole(u.get(k)):,}" for k in columns]
            table.add_row(escape(model), *counts, f"${num(u.get('cost_usd')):.4f}")
        return table

    def _print(self, renderable: RenderableType) -> None:
        self.console.print(renderable)


@contextlib.contextmanager
def warnings_to(show: Callable[[str], None]) -> Iterator[None]:
    """Warnings logged under `rlm` go to `show` (one line each) instead of the log handlers:
    while a run shows, above its live panel rather than inside it."""

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            show(record.getMessage())

    logger = logging.getLogger("rlm")
    handler, propagated = Handler(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagated


# --------------------------------------------------------------------------- waiting

COMPILE_ESTIMATE_S = 90.0  # the sandbox's first compile on a laptop; ~1 s once it is cached


def loading_sandbox(work: Callable[[], T], console: Console | None = None) -> T:
    """`work()`, which loads the sandbox (compiling it, the first time on a machine), shown
    as such."""
    return wait_for(work, "loading the sandbox", "compiling the sandbox for this machine (once)",
                    COMPILE_ESTIMATE_S, console=console)  # fmt: skip


def wait_for(
    work: Callable[[], T],
    label: str,
    slow_label: str,
    estimate_s: float,
    slow_after_s: float = 3.0,
    console: Console | None = None,
) -> T:
    """`work()` on a thread while a spinner shows `label`; past `slow_after_s` it shows
    `slow_label` with a bar filling over `estimate_s` (off a terminal: a line then, and one
    every 15 s). Returns what `work` returned, or raises what it raised."""
    console = console or make_console()
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as e:  # handed to the caller's thread
            outcome["error"] = e
        finally:
            done.set()

    started = time.monotonic()
    threading.Thread(target=run, daemon=True, name="wait-for").start()
    if console.is_terminal and not console.is_dumb_terminal:
        with Live(_Waiting(label, slow_label, estimate_s, slow_after_s, started),
                  console=console, refresh_per_second=LIVE_RATE, transient=True):  # fmt: skip
            done.wait()
    else:
        told = 0.0
        while not done.wait(0.2):
            elapsed = time.monotonic() - started
            if elapsed >= slow_after_s and elapsed - told >= 15:
                told = elapsed
                console.print(f"{slow_label}: {elapsed:.0f} s so far, about {estimate_s:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@dataclass
class _Waiting:
    label: str
    slow_label: str
    estimate_s: float
    slow_after_s: float
    started: float

    def __rich__(self) -> RenderableType:
        elapsed = time.monotonic() - self.started
        if elapsed < self.slow_after_s:
            return Spinner("dots", text=Text(f"{self.label} {_clock(elapsed)}"), style="cyan")
        left = self.estimate_s - elapsed
        grid = Table.grid(padding=(0, 1))
        grid.add_row(
            Spinner("dots", style="cyan"),
            Text(self.slow_label),
            ProgressBar(total=self.estimate_s, completed=min(elapsed, self.estimate_s * 0.97),
                        width=30),
            Text(f"{_clock(elapsed)}" + (f" · about {left:.0f} s left" if left > 1 else
                                         " · almost done"), style="dim"),
        )  # fmt: skip
        return grid


# --------------------------------------------------------------------------- helpers


def make_console(stream: TextIO | None = None) -> Console:
    """The console progress goes to (stderr by default): colours and live redraws on a
    terminal; elsewhere plain text, never wrapped or padded."""
    console = Console(file=stream, stderr=stream is None, highlight=False)
    if not console.is_terminal:
        console = Console(file=stream, stderr=stream is None, highlight=False, color_system=None,
                          soft_wrap=True, emoji=False)  # fmt: skip
    return console


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'s' if n != 1 else ''}"


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _first_line(text: str, limit: int) -> str:
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    return first if len(first) <= limit else first[: limit - 1] + "…"


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _prose(reply: str) -> str:
    """The reply's words without its code, on one line."""
    words = " ".join(s.text for s in segments(reply) if not s.fenced)
    return _one_line(words, 400) or "(code only)"


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _clip_lines(text: Text, limit: int, keep: str = "start") -> Text:
    lines = text.split("\n")
    if len(lines) <= limit:
        return text
    cut = len(lines) - limit
    note = Text(f"… {cut} more lines", style="dim")
    kept = lines[:limit] if keep == "start" else lines[-limit:]
    joined = Text("\n").join(kept)
    return Text("\n").join([joined, note] if keep == "start" else [note, joined])

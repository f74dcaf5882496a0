"""Following a run as it happens: the sub-call path's progress events, the live display on a
real terminal (tmux), plain lines elsewhere, and the sandbox's first compile."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console
from rich.terminal_theme import MONOKAI
from rich.text import Text

from functions.progress import Progress
from functions.sdk import RLM
from functions.testing.haystack import haystack
from functions.testing.scripted_model import ScriptedModel, needle_policy, repl
from tests.conftest import ROOT

TMUX = shutil.which("tmux")


# ----------------------------------------------------------------------------- events


def test_each_subcall_reports_as_it_completes():
    """Prompt "b" is answered only once the run has reported "a" done, and "c" once "b" is:
    events held back until the batch ends would leave "b" and "c" waiting."""
    reported = {name: threading.Event() for name in "abc"}
    events: list[tuple[str, dict]] = []

    def on_event(kind: str, data: dict) -> None:
        events.append((kind, data))
        if kind == "subcall":
            reported[data["prompt"]].set()

    def policy(request):
        if request.is_root:
            return repl("print(llm_query_batched(['a', 'b', 'c']))")
        before = {"a": None, "b": "a", "c": "b"}[request.last]
        if before and not reported[before].wait(20):
            return "late"
        return request.last.upper()

    with ScriptedModel(policy) as model:
        backend = {"base_url": model.base_url, "api_key": "k", "model_name": "m"}
        with RLM(backend, on_event=on_event, max_iterations=1) as rlm:
            result = rlm.completion("c", root_prompt="q")
    cell = next(e for e in result.metadata["trajectory"] if e["kind"] == "cell")
    assert cell["stdout"] == "['A', 'B', 'C']\n"
    kinds = [k for k, _ in events]
    batch = kinds.index("subcalls")
    done = [d for k, d in events if k == "subcall"]
    assert kinds.index("code") < batch < kinds.index("subcall") < kinds.index("output")
    assert events[batch][1]["total"] == 3 and events[batch][1]["kind"] == "llm"
    assert [(d["done"], d["total"], d["prompt"], d["response"]) for d in done] == [
        (1, 3, "a", "A"), (2, 3, "b", "B"), (3, 3, "c", "C")
    ]  # fmt: skip
    assert all(d["run_id"] == result.metadata["run_id"] and d["depth"] == 0 for d in done)
    tokens = sum(u["input_tokens"] + u["output_tokens"] for d in done for u in d["usage"].values())
    cell_usage = cell["subcalls"]["usage"].values()
    assert tokens == sum(u["input_tokens"] + u["output_tokens"] for u in cell_usage)


def test_the_display_takes_events_from_many_threads_at_once():
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100, color_system="truecolor")
    progress = Progress(console=console)
    threads = 16
    with progress:
        progress("turn", {"iteration": 1, "depth": 0})
        progress("code", {"iteration": 1, "code": "llm_query_batched(prompts)", "depth": 0})
        progress("subcalls", {"total": threads * 100, "depth": 0})

        def report(n: int) -> None:
            for i in range(100):
                usage = {"m": {"input_tokens": 3, "output_tokens": 1, "cost_usd": 0.001}}
                progress("subcall", {"done": i, "total": 1600, "prompt": f"p{n}-{i}",
                                     "response": "r", "usage": usage, "depth": 0})  # fmt: skip
                progress.__rich__()  # a redraw, as the live panel's thread does

        workers = [threading.Thread(target=report, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert progress.state.batch_done == threads * 100
        assert progress.state.pending_tokens == threads * 100 * 4
        live = Console(file=io.StringIO(), width=100, force_terminal=True)
        live.print(progress.__rich__())
        drawn = live.file.getvalue()
        assert "1600/1600" in drawn and "6,400 tokens" in drawn and "$1.6000" in drawn


# ----------------------------------------------------------------------------- a terminal


class Terminal:
    """A tmux window of a fixed size running a plain shell (prompt "$ ") in `folder`, with this
    checkout's `rlm` first on PATH and the environment `env`; commands typed into it, its
    screen read back."""

    def __init__(self, folder: Path, env: dict[str, str], columns: int = 110, rows: int = 32):
        self.name = f"rlm-{uuid.uuid4().hex[:8]}"
        self.columns = columns
        path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
        settings = [f"{k}={v}" for k, v in {**env, "PATH": path, "PS1": "$ "}.items()]
        # `env` in the command itself: the session's own environment may not win over PATH
        subprocess.run([TMUX, "new-session", "-d", "-s", self.name, "-x", str(columns),
                        "-y", str(rows), "-c", str(folder), "env", *settings,
                        "bash", "--norc", "--noprofile"], check=True)  # fmt: skip
        try:
            self.wait_until(lambda screen: screen.strip() == "$")
        except AssertionError:
            self.close()
            raise

    def type(self, command: str) -> None:
        """Type `command` on a cleared screen."""
        subprocess.run([TMUX, "send-keys", "-t", self.name, "clear", "Enter"], check=True)
        self.wait_until(lambda screen: screen.strip() == "$")
        subprocess.run([TMUX, "send-keys", "-t", self.name, command, "Enter"], check=True)

    def finish(self, timeout_s: float = 90) -> int:
        """Wait for the prompt to come back; keep the screen as it is then (`shown`, and
        `history` with what scrolled off), and return the command's exit code (asked after,
        so it is not on the kept screen)."""
        self.wait_until(lambda screen: screen.rstrip().endswith("\n$"), timeout_s)
        self.shown = self.screen(colors=True)
        self.history = self.screen(history=True)
        subprocess.run([TMUX, "send-keys", "-t", self.name, "echo EXIT=$?", "Enter"], check=True)
        return int(re.search(r"EXIT=(\d+)", self.wait_for(r"EXIT=\d+")).group(1))

    def screen(self, colors: bool = False, history: bool = False) -> str:
        """What the window shows (with `history`, what scrolled off it too)."""
        flags = (["-e"] if colors else []) + (["-S", "-"] if history else [])
        done = subprocess.run([TMUX, "capture-pane", "-p", *flags, "-t", self.name],
                              capture_output=True, text=True, check=True)  # fmt: skip
        return done.stdout

    def wait_for(self, pattern: str, timeout_s: float = 60) -> str:
        return self.wait_until(lambda screen: re.search(pattern, screen) is not None, timeout_s)

    def wait_until(self, shows: Callable[[str], bool], timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            screen = self.screen()
            if shows(screen):
                return screen
            time.sleep(0.1)
        raise AssertionError(f"the screen never showed what was awaited:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run([TMUX, "kill-session", "-t", self.name], check=False)


def model_env(model: ScriptedModel) -> dict[str, str]:
    return {
        "LLM_BASE_URL": model.base_url,
        "LLM_MODEL": "scripted-root",
        "LLM_SUB_MODEL": "scripted-sub",
        "LLM_PRICES": '{"scripted-sub": [0.4, 1.6]}',
    }  # the root has no price: a warning


def slow(policy, root_s: float, sub_s):
    """`policy` answering root turns after `root_s` and each sub-call after `sub_s(prompt)`."""

    def answer(request):
        time.sleep(root_s if request.is_root else sub_s(request.last))
        return policy(request)

    return answer


def screenshot(terminal: Terminal, name: str, folder: Path, screen: str | None = None) -> None:
    """The terminal's screen, colors and all, as a PNG (Chromium draws rich's HTML of it)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return
    console = Console(record=True, width=terminal.columns, file=io.StringIO(),
                      force_terminal=True, color_system="truecolor")  # fmt: skip
    screen = terminal.screen(colors=True) if screen is None else screen
    console.print(Text.from_ansi(screen.rstrip("\n")), soft_wrap=True)
    page_html = console.export_html(theme=MONOKAI, inline_styles=True)
    page_html = page_html.replace("<pre ", "<pre id='screen' ").replace(
        "</style>", "pre{margin:0;padding:14px 18px;font-size:14px;line-height:1.3}</style>"
    )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.set_content(page_html)
        target = folder / name
        page.locator("#screen").screenshot(path=str(target))
        browser.close()
    kept = os.environ.get("RLM_SCREENSHOT_DIR")
    if kept:
        Path(kept).mkdir(parents=True, exist_ok=True)
        shutil.copy(target, Path(kept) / name)


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (.ci/run installs it)")
def test_the_live_display_on_a_terminal(tmp_path):
    (tmp_path / "haystack.txt").write_text(haystack(2_000_000, 31337))
    # The root takes 3 s a turn; the 20 sub-calls finish one after another over ~3 s.
    policy = slow(needle_policy, 3.0, lambda prompt: 0.3 + zlib.crc32(prompt.encode()) % 30 / 10)
    with ScriptedModel(policy) as model:
        terminal = Terminal(tmp_path, model_env(model))
        try:
            terminal.type("rlm ask 'What is the magic number?' --context haystack.txt")
            # The clock ticks while the model thinks: two looks a second apart differ.
            first = terminal.wait_for(r"turn 1 · waiting for the model 0:01")
            time.sleep(1.2)
            second = terminal.screen()
            assert re.search(r"waiting for the model 0:0[2-3]", second), second
            assert first != second
            # Sub-calls count up as they complete, the reply and the cell on show.
            screen = terminal.wait_for(r"sub-calls .* (1[0-4])/20", timeout_s=30)
            assert "reply     I will search the context chunk by chunk" in screen
            assert "cell      if isinstance(context, str):  (+18 lines)" in screen
            # A warning is a line above the panel, not inside it.
            lines = screen.splitlines()
            warning = next(i for i, ln in enumerate(lines) if ln.startswith("warning: no price"))
            assert warning < next(i for i, ln in enumerate(lines) if ln.startswith("╭"))
            screenshot(terminal, "terminal-live.png", tmp_path)
            assert terminal.finish() == 0
        finally:
            terminal.close()
    screen = terminal.history
    assert "\n31337\n" in screen
    assert "turn 1: cell done in" in screen and "turn 2: cell done in" in screen
    assert re.search(r"✔ completed · 2 turns · 20 sub-calls · [\d,]+ tokens", screen)
    assert "╭" not in screen  # the live panel is gone once the run ends


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (.ci/run installs it)")
def test_verbose_on_a_terminal_shows_the_whole_run(tmp_path):
    (tmp_path / "haystack.txt").write_text(haystack(300_000, 4242))
    with ScriptedModel(needle_policy) as model:
        terminal = Terminal(tmp_path, model_env(model), rows=84)
        try:
            terminal.type("rlm ask 'What is the magic number?' -c haystack.txt --verbose "
                          "--max-iterations 5")  # fmt: skip
            assert terminal.finish() == 0
            screenshot(terminal, "terminal-verbose.png", tmp_path, terminal.shown)
        finally:
            terminal.close()
    for shown in ("question   What is the magic number?", "limits     max-iterations 5",
                  "turn 2 · reply", "turn 2 · cell 1", "↳ llm_query 3/3 · scripted-sub",
                  "output · 3 sub-calls", "3 chunks searched; found: ['4242']", "total",
                  "✔ completed · 2 turns · 3 sub-calls"):  # fmt: skip
        assert shown in terminal.history, shown


# ----------------------------------------------------------------------------- the sandbox


@pytest.mark.slow
def test_warm_with_an_empty_cache_says_what_it_is_doing_and_how_long(tmp_path):
    """The first compile on a machine (about a minute and a half): lines off a terminal."""
    cache = tmp_path / "cache"
    done = subprocess.run([sys.executable, "-m", "functions.cli", "warm", str(cache)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert re.match(r"sandbox ready in [\d.]+ s \(compiled; cache: ", done.stdout)
    lines = done.stderr.splitlines()
    assert lines and all(
        re.fullmatch(r"compiling the sandbox for this machine \(once\): \d+ s so far, about "
                     r"90 s", line) for line in lines
    ), done.stderr  # fmt: skip
    again = subprocess.run([sys.executable, "-m", "functions.cli", "warm", str(cache)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert "loaded from the cache" in again.stdout and again.stderr == ""


def test_malformed_events_are_passed_over():
    """Events from a deployed infer are a server's JSON: wrong shapes change nothing."""
    console = Console(file=io.StringIO(), force_terminal=False, width=100)
    progress = Progress(console=console, verbose=True)
    with progress:
        for kind, data in [("subcalls", {"total": "many"}), ("turn", {"iteration": [1]}),
                           ("usage", {"m": {"input_tokens": "x"}}), ("subcall", None),
                           ("output", {"subcalls": {}}), ("code", {"code": 5}),
                           ("final", {"status": "completed", "iterations": "two"})]:  # fmt: skip
            progress(kind, data)
        progress("turn", {"iteration": 2, "depth": 0})
    assert progress.state.turn == 2
    assert "Traceback" not in console.file.getvalue()

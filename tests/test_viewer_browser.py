"""The trajectory page in headless Chromium (Debian's, driven by Playwright): what a reader sees
on opening it, the keys and the sub-call filter, and that it asks the network for nothing.

Screenshots of a 3-turn run, a 50-turn run and a 200-sub-call run are taken into the test's
folder; with RLM_SCREENSHOT_DIR set (docs/images for the README's) they are kept there too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.viewer_runs import run

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed")
VIEWPORT = {"width": 1400, "height": 900}


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """Each scenario's page, made by `rlm view` from the run's JSONL."""
    folder = tmp_path_factory.mktemp("pages")
    made = {}
    with pytest.MonkeyPatch.context() as patch:
        for name in ("three", "fifty", "subcalls"):
            trajectory, result = run(name, patch)
            source = folder / f"{name}.jsonl"
            source.write_text("".join(_json(e) + "\n" for e in trajectory))
            page = folder / f"{name}.html"
            done = subprocess.run([sys.executable, "-m", "functions.cli", "view", str(source),
                                   "-o", str(page)], cwd=ROOT, capture_output=True, text=True,
                                  timeout=60)  # fmt: skip
            assert done.returncode == 0, done.stderr
            made[name] = (page, trajectory, result)
    return made


def _json(entry) -> str:
    import json

    return json.dumps(entry)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


class Opened:
    """A page opened in a fresh context, with every request and error it caused."""

    def __init__(self, browser, page_file: Path, turn: int | None = None, viewport=VIEWPORT):
        self.context = browser.new_context(viewport=viewport)
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        url = page_file.as_uri() + (f"#r1-t{turn}" if turn else "")
        self.page.goto(url)
        self.url = url

    def in_view(self, selector: str) -> bool:
        """Whether the element is wholly on screen without scrolling."""
        return self.page.evaluate(
            """s => { const r = document.querySelector(s).getBoundingClientRect();
                      return r.height > 0 && r.top >= 0 && r.bottom <= innerHeight; }""",
            selector,
        )

    def shoot(self, name: str, folder: Path, full_page: bool = False) -> Path:
        target = folder / name
        self.page.screenshot(path=str(target), full_page=full_page)
        kept = os.environ.get("RLM_SCREENSHOT_DIR")
        if kept:
            Path(kept).mkdir(parents=True, exist_ok=True)
            shutil.copy(target, Path(kept) / name)
        return target

    def close(self) -> None:
        self.context.close()


SHOTS = [("three", 3, "viewer-3-turns.png"), ("fifty", 30, "viewer-50-turns.png"),
         ("subcalls", 2, "viewer-200-subcalls.png")]  # fmt: skip


@pytest.mark.parametrize(("name", "turn", "shot"), SHOTS)
def test_the_question_and_outcome_are_seen_first_and_nothing_is_fetched(
    browser, pages, tmp_path, name, turn, shot
):
    page_file, _, result = pages[name]
    for viewport in (VIEWPORT, {"width": 1280, "height": 720}):
        opened = Opened(browser, page_file, turn, viewport)
        try:
            assert opened.in_view(".run.on .question") and opened.in_view(".run.on .outcome")
            top = opened.page.inner_text(".run.on header")
            assert result.response in top
            assert opened.page.evaluate("scrollY") == 0
            assert opened.page.is_visible(f".run.on main > .turn:nth-of-type({turn})")
            if viewport is VIEWPORT:
                whole = name == "three"  # the whole page, with the child RLM opened
                if whole:
                    opened.page.click(".run.on main > .turn.on .sc:has(.b-child) > summary")
                    assert opened.page.is_visible(".run.on main > .turn.on .child")
                image = opened.shoot(shot, tmp_path, full_page=whole)
                assert image.stat().st_size > 20_000
            assert opened.requests == [opened.url.split("#")[0]], opened.requests
            assert opened.errors == []
        finally:
            opened.close()


def test_keys_move_between_turns_and_the_sidebar_follows(browser, pages):
    page_file, trajectory, _ = pages["fifty"]
    turns = len([e for e in trajectory if e["kind"] == "llm"])
    opened = Opened(browser, page_file)
    page = opened.page
    try:
        assert page.evaluate("document.querySelectorAll('main > .turn.on').length") == 1
        assert page.is_visible("main > .turn:nth-of-type(1)")
        for key, expected in (("j", 2), ("ArrowRight", 3), ("k", 2), ("G", turns),
                              ("ArrowLeft", turns - 1), ("g", 1)):  # fmt: skip
            page.keyboard.press(key)
            assert page.evaluate("location.hash") == f"#r1-t{expected}", key
            assert page.is_visible(f"main > .turn:nth-of-type({expected})")
            assert not page.is_visible(f"main > .turn:nth-of-type({expected % turns + 1})")
            assert opened.in_view(".tlink.on"), key  # the sidebar keeps the turn on screen
        page.click(".tlink[data-pos='7']")
        assert page.evaluate("location.hash") == "#r1-t7"
        page.keyboard.press("a")
        assert page.evaluate("document.querySelectorAll('main > .turn:not([hidden])')"
                             ".length") == turns  # fmt: skip
        assert page.is_visible("main > .turn:nth-of-type(40)")
        assert opened.errors == []
    finally:
        opened.close()


def test_the_subcall_table_filters_and_expands(browser, pages):
    page_file, _, result = pages["subcalls"]
    opened = Opened(browser, page_file, turn=2)
    page = opened.page
    rows = ".turn.on .sc"
    shown = f"{rows}:not([hidden])"
    try:
        assert page.locator(shown).count() == 200
        page.keyboard.press("/")
        page.keyboard.type(result.response)
        assert page.locator(shown).count() == 1
        assert page.inner_text(".turn.on .shown") == "1 of 200"
        page.keyboard.press("Escape")
        assert page.locator(shown).count() == 200
        page.click(".turn.on .chip[data-q='NONE']")
        assert page.locator(shown).count() == 199
        page.click(".turn.on .chip[data-q='NONE']")  # again: the filter is cleared
        assert page.locator(shown).count() == 200
        row = page.locator(rows).nth(41)
        assert not row.locator("pre").first.is_visible()
        row.locator("summary").click()
        assert row.locator("pre").first.is_visible()
        assert "Find the magic number in this text." in row.locator("pre").first.inner_text()
        page.keyboard.press("e")
        assert page.locator(f"{rows}[open]").count() == 200
        assert opened.errors == []
    finally:
        opened.close()


def test_without_script_every_turn_is_on_the_page(browser, pages):
    page_file, _, _ = pages["three"]
    context = browser.new_context(java_script_enabled=False, viewport=VIEWPORT)
    try:
        page = context.new_page()
        page.goto(page_file.as_uri())
        assert page.locator("main > .turn:visible").count() == 3
        assert page.is_visible(".question")
    finally:
        context.close()

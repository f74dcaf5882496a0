"""The trajectory page, read as HTML: what it shows at the top, each turn's reply with its code
once, the sub-call table, outcomes of every kind, and files that are not what they claim."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from functions.sdk import RLM
from functions.testing.scripted_model import Fault, ScriptedModel, repl
from functions.viewer import load_trajectory, render
from tests.conftest import ROOT
from tests.viewer_runs import run


@pytest.fixture(scope="module")
def runs():
    with pytest.MonkeyPatch.context() as patch:
        return {name: run(name, patch) for name in ("three", "fifty", "subcalls")}


def visible_text(page: str) -> str:
    """The page's text as a reader sees it: tags and the script and style removed."""
    body = re.sub(r"<(script|style)\b.*?</\1>", "", page, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", "", body))


def start_tags(page: str) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """Every element a browser would make of the page, with its attributes."""
    found = []

    class Tags(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.append((tag, attrs))

    Tags().feed(page)
    return found


def header(page: str) -> str:
    return page[page.index("<header") : page.index("</header>")]


def view(tmp_path, entries_or_text, name="run.jsonl"):
    """`rlm view` as a user runs it, on a file holding `entries_or_text`."""
    source = tmp_path / name
    if isinstance(entries_or_text, list):
        entries_or_text = "".join(json.dumps(e) + "\n" for e in entries_or_text)
    if isinstance(entries_or_text, bytes):
        source.write_bytes(entries_or_text)
    else:
        source.write_text(entries_or_text)
    out = tmp_path / (name + ".html")
    command = [sys.executable, "-m", "functions.cli", "view", str(source), "-o", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr
    return done, (out.read_text() if out.exists() else "")


def test_question_model_and_outcome_come_first(runs):
    trajectory, result = runs["three"]
    page = render(trajectory, "three.jsonl")
    top = visible_text(header(page))
    assert "Which city is named most often in the shipping log" in top
    assert "scripted-root" in top and "scripted-sub" in top
    assert "Completed" in top and result.response in top
    assert "turns 3" in top and "sub-calls 7" in top
    assert f"${result.metadata['total_cost_usd']:.4f}" in top
    assert page.index("<header") < page.index("<nav") < page.index("<main")


def test_each_cell_is_shown_once_after_the_words_that_came_with_it(runs):
    trajectory, _ = runs["three"]
    text = visible_text(render(trajectory))
    assert text.count("from collections import Counter") == 1
    assert text.count("print(len(context))") == 1
    # The reply's words come before its code, and the code before what it printed.
    words = text.index("Counter needs its import.")
    code = text.index("from collections import Counter")
    printed = text.index("child RLM says: yes")
    assert words < code < printed
    assert "NameError" in text  # turn 2's error, under its code


def test_turns_have_badges_and_their_own_totals(runs):
    trajectory, _ = runs["three"]
    page = render(trajectory)
    nav = page[page.index("<nav") : page.index("</nav>")]
    links = re.findall(r"<a class='tlink'.*?</a>", nav)
    assert len(links) == 3
    assert "b-error" in links[1] and "b-error" not in links[0]
    assert "b-answer" in links[2] and "b-child" in links[2] and "7 sub-calls" in links[2]
    turns = re.findall(r"<section class='turn' id='r1-t\d'>.*?<span class='stats'>(.*?)</span>",
                       page)  # fmt: skip
    assert len(turns) == 3
    for stats in turns:
        assert re.fullmatch(r"[\d.]+ s · [\d,]+ tokens · \$[\d.]+( · \d+ sub-calls)?", stats)


def test_subcalls_are_rows_with_previews_and_a_child_rlm_nested(runs):
    trajectory, _ = runs["three"]
    page = render(trajectory)
    rows = re.findall(r"<details class='sc' data-a=.*?</summary>", page)
    assert len(rows) >= 7
    assert all("<span class='a'>" in row for row in rows)
    root_rows = [r for r in rows if "Which city is named" in r or "…" in r]
    assert any(">Porto</span>" in r for r in root_rows)
    child = page[page.index("<div class='child") :]
    assert "child RLM</b> at depth 1" in child
    assert "Counting both names in the text I was given." in child  # the child's own turn


def test_two_hundred_subcalls_show_their_answers_at_a_glance(runs):
    trajectory, _ = runs["subcalls"]
    page = render(trajectory)
    assert page.count("<details class='sc' ") == 200
    chips = re.findall(r"class='chip' data-q='([^']*)'.*?<i>&times;(\d+)</i>", page)
    assert ("NONE", "199") in chips and ("8675309", "1") in chips
    # The instructions every prompt shares are said once; the rows show what differs.
    assert "every prompt starts <q>Find the magic number in this text." in page
    row = re.search(r"<span class='p'>(.*?)</span>", page).group(1)
    assert row.startswith("…") and "Find the magic" not in row


def test_a_run_out_of_turns_is_not_shown_as_an_answer(runs):
    trajectory, result = runs["fifty"]
    page = render(trajectory)
    top = visible_text(header(page))
    assert "max_iterations" in top and "Completed" not in top
    assert result.response in top
    assert "top completed" not in page
    assert re.search(r"<header class='top (forced|stopped)'>", page)
    assert page.count("<a class='tlink'") == len([e for e in trajectory if e["kind"] == "llm"])


def test_stopped_and_failed_runs_say_so_without_an_answer(tmp_path, monkeypatch):
    def looping(request):
        return repl("print(1)") if request.is_root else "x"

    with ScriptedModel(looping) as model:
        backend = {"base_url": model.base_url, "api_key": "k", "model_name": "scripted-root"}
        monkeypatch.setenv("LLM_PRICES", '{"scripted-root": [1000.0, 1000.0]}')
        with RLM(backend) as rlm:
            stopped = rlm.completion("c", root_prompt="Loop.", max_budget_usd=0.5)
        model.inject(Fault(status=400))
        with RLM(backend) as rlm:
            failed = rlm.completion("c", root_prompt="Fail.")
    assert stopped.status == "stopped" and failed.status == "failed"
    page = render(stopped.metadata["trajectory"])
    top = visible_text(header(page))
    assert "Stopped · max_budget_usd" in top and "no answer" in top and "None" not in top
    assert "<header class='top stopped'>" in page
    page = render(failed.metadata["trajectory"])
    top = visible_text(header(page))
    assert "Failed" in top and "no answer" in top and "400" in top
    assert "<header class='top failed'>" in page


def test_an_older_trajectory_without_its_run_entry_still_reads(runs, tmp_path):
    trajectory, result = runs["three"]
    older = [e for e in trajectory if e["kind"] != "run"]
    done, page = view(tmp_path, older)
    assert done.returncode == 0
    top = visible_text(header(page))
    assert "The question is not recorded in this trajectory" in top
    assert "scripted-root" in top and result.response in top


def test_an_unfinished_trajectory_says_so(runs, tmp_path):
    trajectory, _ = runs["three"]
    done, page = view(tmp_path, trajectory[:-1])
    assert done.returncode == 0
    assert "Unfinished" in visible_text(header(page)) and "no answer" in header(page)


def test_hostile_content_is_text_on_the_page(tmp_path):
    evil = "<script>alert(1)</script></pre><img src=x onerror=alert(2)>' onmouseover='alert(3)"

    def policy(request):
        if not request.is_root:
            return evil
        if request.turn == 0:
            return repl(f"print({evil!r})\nllm_query_batched([{evil!r}, 'b'])", evil)
        return f"FINAL({evil})"

    with ScriptedModel(policy) as model:
        backend = {"base_url": model.base_url, "api_key": "k", "model_name": evil}
        with RLM(backend) as rlm:
            result = rlm.completion(evil, root_prompt=evil)
    page = render(result.metadata["trajectory"], title=evil)
    tags = start_tags(page)
    assert [name for name, _ in tags].count("script") == 1  # the page's own
    assert "img" not in {name for name, _ in tags}
    for _, attributes in tags:
        for name, value in attributes:
            assert not name.startswith("on") and name != "src", (name, value)
            assert name != "href" or (value or "").startswith("#"), value
    assert "alert(1)" in visible_text(page)


def test_files_that_are_not_trajectories_are_one_line_and_exit_2(tmp_path):
    cases = [
        ("", "holds no entries"),
        ("\n\n", "holds no entries"),
        ("{}\n", "line 1 is not an entry"),
        ('{"kind": "llm"}\nnot json\n', "line 2 is not JSON"),
        ("[1, 2]\n", "line 1 is not an entry"),
        ("[" * 100_000 + "\n", "line 1 is not JSON"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
    ]
    for content, words in cases:
        done, _ = view(tmp_path, content)
        assert done.returncode == 2, (content[:20], done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (content[:20], done.stderr)


def test_entries_with_the_wrong_shapes_still_render(tmp_path):
    entries = [
        {"kind": "run", "query": ["not", "text"], "model": 7},
        {"kind": "llm", "iteration": "two", "response": None, "usage": [1, 2], "seconds": "x"},
        {"kind": "cell", "iteration": 1, "code": 5, "error": "boom", "subcalls": [],
         "subcall_log": [{"calls": "nope"}, 3, {"kind": "llm", "calls": [None, {"prompt": 1}]}]},
        {"kind": "compaction", "iteration": None, "count": "a", "summary": {"x": 1}},
        {"kind": "final", "status": ["?"], "answer": {"a": 1}, "usage": "none",
         "execution_time": "fast", "stop_code": 3},
        {"kind": "mystery", "depth": -4},
    ]  # fmt: skip
    done, page = view(tmp_path, entries)
    assert done.returncode == 0, done.stderr
    assert "<header" in page


def test_deeply_nested_child_rlms_are_bounded(tmp_path):
    entry = {"kind": "final", "status": "completed", "answer": "leaf", "run_id": "x", "depth": 40}
    for depth in range(40, 0, -1):
        cell = {"kind": "cell", "iteration": 1, "code": "rlm_query('q')", "run_id": "x",
                "depth": depth - 1, "subcall_log": [{"kind": "rlm", "model": "m", "depth": depth,
                "calls": [{"prompt": "p", "response": "r", "trajectory": [entry]}]}]}  # fmt: skip
        entry = cell
    done, page = view(tmp_path, [entry])
    assert done.returncode == 0, done.stderr
    assert "deeper levels are not drawn" in page


def test_a_file_of_several_runs_offers_each(tmp_path, monkeypatch):
    log = tmp_path / "session.jsonl"
    with ScriptedModel(lambda r: "FINAL(ok)" if r.is_root else "x") as model:
        backend = {"base_url": model.base_url, "api_key": "k", "model_name": "scripted-root"}
        with RLM(backend, logger=str(log), persistent=True) as rlm:
            rlm.completion("a", root_prompt="First?")
            rlm.completion("b", root_prompt="Second?")
    page = render(load_trajectory(log), "session.jsonl")
    assert page.count("<div class='run' id='r") == 2
    assert "run 1 of 2 in this file" in page and "run 2 of 2 in this file" in page

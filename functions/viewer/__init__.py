"""A trajectory (JSONL) as one self-contained HTML page, for reading a run afterwards.

At the top: the question, the model and the outcome (completed, or stopped with its code) with
the answer, and the run's totals. Beside the turns, a sidebar of them with badges (answer,
error, stopped, child RLM); each turn shows the model's reply with its code highlighted once
and followed by what the code printed, its sub-calls as a compact table (prompt and answer
previews, a filter, each row expandable), and child RLMs nested. The page's style and script
are inline; its Content-Security-Policy lets it fetch nothing.
"""

from __future__ import annotations

import base64
import hashlib
import html
import os
from collections import Counter
from functools import cache
from importlib.resources import files
from typing import Any

from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

from functions.infer.parsing import segments
from functions.reading import num, text, whole
from functions.viewer.run import Cell, Run, SubCall, Turn, load_trajectory, runs_of

__all__ = ["load_trajectory", "render"]

PREVIEW = 200  # characters of a sub-call's prompt or answer in its row
CHIPS = 6  # the most common answers offered as filters
NESTED = 6  # child RLM levels drawn; deeper ones are named, not drawn
SETUP_CHARS = 20_000  # of the system prompt and first message
LONG_LIST = 20  # sub-calls past which their list scrolls on its own
SHARED_START = 24  # characters all prompts of a batch share, at least, to be shown once


def render(entries: list[dict[str, Any]], title: str = "RLM run") -> str:
    runs = runs_of(entries)
    script = _asset("page.js")
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    policy = f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{digest}'"
    first = runs[-1].question if runs else None
    heading = f"{first} · {title}" if first else title
    body = "".join(_run(run, i, len(runs), title) for i, run in enumerate(runs, 1))
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{policy}\">"
        f"<title>{_e(_clip(heading, 120))}</title>"
        f"<style>{_asset('page.css')}{_code_style()}</style></head>"
        f"<body>{body or _nothing()}<script>{script}</script></body></html>"
    )


# ----------------------------------------------------------------------------- a run


def _run(run: Run, index: int, count: int, title: str) -> str:
    ident = f"r{index}"
    outcome = run.outcome
    used = run.used
    switcher = ""
    if count > 1:
        links = "".join(
            f"<a href='#r{i}-t1' class='{'on' if i == index else ''}'>{i}</a>"
            for i in range(1, count + 1)
        )
        switcher = f"<span>run {index} of {count} in this file: {links}</span>"
    question = (
        f"<h1 class='question' title='click to show it all'>{_e(run.question)}</h1>"
        if run.question
        else "<h1 class='question missing'>The question is not recorded in this trajectory</h1>"
    )
    facts = [("model", run.model or "not recorded")]
    if run.sub_models and run.sub_models != [run.model]:
        facts.append(("sub-calls to", ", ".join(run.sub_models)))
    facts += [
        ("turns", f"{len(run.turns):,}"),
        ("sub-calls", f"{run.subcall_count:,}"),
        ("tokens", f"{used.tokens:,}"),
        ("cost", f"${used.cost:.4f}"),
        ("time", _seconds(used.seconds)),
    ]
    if run.limits:
        facts.append(("limits", run.limits))
    facts_html = "".join(f"<span>{_e(k)} <b>{_e(v)}</b></span>" for k, v in facts)
    marks = {"completed": "✔", "forced": "⚑", "stopped": "■", "failed": "✘", "unfinished": "…"}
    label = "answer so far" if outcome.kind in ("stopped", "failed") else "answer"
    if outcome.kind == "forced":
        label = "answer at the limit"
    answer = (
        f"<pre class='answer'>{_e(outcome.answer)}</pre>"
        if outcome.answer is not None
        else "<div class='answer none'>no answer</div>"
    )
    why = f"<div class='why'>{_e(outcome.detail)}</div>" if outcome.detail else "<div></div>"
    header = (
        f"<header class='top {outcome.kind}'>"
        f"<div class='brand'><span>rlm run · {_e(title)}"
        f"{' · ' + _e(run.run_id) if run.run_id else ''}</span>{switcher}</div>"
        f"{question}<div class='facts'>{facts_html}</div>"
        f"<div class='outcome {outcome.kind}'>"
        f"<div class='status'>{marks[outcome.kind]} {_e(outcome.title)}</div>{why}"
        f"<div class='answerlabel'>{label}</div>{answer}</div></header>"
    )
    nav = "".join(_turn_link(turn, ident, pos) for pos, turn in enumerate(run.turns, 1))
    keys = (
        "<div class='keys'><kbd>j</kbd>/<kbd>k</kbd> or <kbd>→</kbd>/<kbd>←</kbd> next and "
        "previous turn · <kbd>/</kbd> filter sub-calls · <kbd>e</kbd> open all sub-calls · "
        "<kbd>a</kbd> all turns at once</div>"
    )
    turns = "".join(
        _turn(turn, f"{ident}-t{pos}", run if pos == 1 else None, 0)
        for pos, turn in enumerate(run.turns, 1)
    )
    return (
        f"<div class='run' id='{ident}'>{header}<div class='layout'>"
        f"<nav class='turns' aria-label='turns'><div class='navhead'><span>"
        f"{_count(len(run.turns), 'turn')}</span></div>{nav}{keys}</nav>"
        f"<main>{turns or _nothing('No turns: the run ended before the model first replied.')}"
        "</main></div></div>"
    )


def _turn_link(turn: Turn, run_ident: str, position: int) -> str:
    badges = "".join(_badge(b) for b in turn.badges)
    if turn.subcall_count:
        badges += _badge("subcalls", _count(turn.subcall_count, "sub-call"))
    return (
        f"<a class='tlink' href='#{run_ident}-t{position}' data-pos='{position}'>"
        f"<span class='n'>{turn.number}</span><span class='gist'>{_e(_gist(turn))}</span>"
        f"<span class='tm'>{_seconds(turn.used.seconds)}</span>"
        f"<span class='bs'>{badges}</span></a>"
    )


def _gist(turn: Turn) -> str:
    """A turn in a few words: its reply's first line of prose, else of code."""
    reply = text(turn.reply.get("response")) if turn.reply else ""
    parts = segments(reply)
    for segment in [s for s in parts if not s.fenced] + [s for s in parts if s.fenced]:
        line = next((ln.strip() for ln in segment.text.splitlines() if ln.strip()), "")
        if line:
            return _clip(line, 90)
    if turn.notes:
        return "the conversation was summarized"
    return "(no reply)" if turn.reply is None else "(an empty reply)"


# ----------------------------------------------------------------------------- a turn


def _turn(turn: Turn, ident: str, setup_of: Run | None, depth: int) -> str:
    used = turn.used
    stats = f"{_seconds(used.seconds)} · {used.tokens:,} tokens · ${used.cost:.4f}" + (
        " · " + _count(turn.subcall_count, "sub-call") if turn.subcall_count else ""
    )
    badges = "".join(_badge(b) for b in turn.badges)
    parts = [
        f"<section class='turn' id='{ident}'><h2>Turn {turn.number} {badges}"
        f"<span class='stats'>{_e(stats)}</span></h2>"
    ]
    if setup_of is not None and setup_of.start:
        parts.append(_setup(setup_of.start))
    for note in turn.notes:
        parts.append(
            f"<details class='note'><summary>Compaction {whole(note.get('count'))}: the "
            f"conversation was summarized, {whole(note.get('tokens_before')):,} → "
            f"{whole(note.get('tokens_after')):,} tokens (limit "
            f"{whole(note.get('limit_tokens')):,})</summary>"
            f"<pre>{_e(text(note.get('summary')))}</pre></details>"
        )
    parts.append(_reply(turn, depth))
    parts.append("</section>")
    return "".join(parts)


def _setup(start: dict[str, Any]) -> str:
    system = _clip(text(start.get("system_prompt")), SETUP_CHARS)
    first = _clip(text(start.get("first_user_message")), SETUP_CHARS)
    if not system and not first:
        return ""
    return (
        "<details class='setup'><summary>The system prompt and the first message</summary>"
        f"<pre>{_e(system)}</pre><pre>{_e(first)}</pre></details>"
    )


def _reply(turn: Turn, depth: int) -> str:
    """The reply's prose in order, each code block it ran followed by that cell's results."""
    if turn.reply is None and not turn.cells:
        return ""
    cells = list(turn.cells)
    out = []
    number = 0
    for segment in segments(text(turn.reply.get("response")) if turn.reply else ""):
        if not segment.fenced:
            if segment.text.strip():
                out.append(f"<div class='prose'>{_e(segment.text.strip(chr(10)))}</div>")
        elif not segment.runs:
            out.append(f"<pre class='aside'>{_e(segment.text)}</pre>")
        else:
            number += 1
            cell = _take_cell(cells, segment.text)
            out.append(_cell(segment.text, cell, number, depth))
    for cell in cells:  # cells with no block of their own: a FINAL_VAR(...) lookup
        number += 1
        out.append(_cell(cell.code, cell, number, depth))
    if turn.reply is None:
        out.insert(0, "<div class='empty'>The model's reply is not in the trajectory.</div>")
    return "<div class='reply'>" + "".join(out) + "</div>"


def _take_cell(cells: list[Cell], code: str) -> Cell | None:
    """The cell that ran this block: the next one in order with the same code."""
    for i, cell in enumerate(cells):
        if cell.code.strip() == code.strip():
            return cells.pop(i)
    return None


def _cell(code: str, cell: Cell | None, number: int, depth: int) -> str:
    head = [f"<span>cell {number}</span>"]
    body = [f"<pre class='code'>{_highlight(code)}</pre>"]
    if cell is None:
        body.append("<div class='notrun'>not run: the run had its answer before this block"
                    "</div>")  # fmt: skip
        return f"<div class='cell'><div class='cellhead'>{''.join(head)}</div>{''.join(body)}</div>"
    entry = cell.entry
    if cell.error:
        head.append(_badge("error"))
    if entry.get("trapped"):
        head.append(_badge("stopped", f"stopped: {text(entry['trapped'])}"))
    if cell.answered:
        head.append(_badge("answer"))
    head.append(f"<span class='t'>{_seconds(num(entry.get('seconds')))}</span>")
    stdout, stderr = text(entry.get("stdout")), text(entry.get("stderr"))
    if stdout:
        body.append(
            f"<div class='out'><span class='lbl'>output</span><pre>{_e(stdout)}</pre></div>"
        )
    error = cell.error
    if stderr and error and error.strip() in stderr:
        stderr = stderr.replace(error.strip(), "").strip()  # the traceback is shown below
    if stderr.strip():
        body.append(
            f"<div class='out'><span class='lbl'>stderr</span><pre>{_e(stderr)}</pre></div>"
        )
    if error:
        body.append(
            f"<div class='out err'><span class='lbl'>error</span><pre>{_e(error)}</pre></div>"
        )
    if not stdout and not stderr.strip() and not error:
        body.append("<div class='out quiet'>printed nothing</div>")
    if cell.subcalls:
        body.append(_subcalls(cell.subcalls, depth))
    return f"<div class='cell'><div class='cellhead'>{''.join(head)}</div>{''.join(body)}</div>"


# ----------------------------------------------------------------------------- sub-calls


def _subcalls(calls: list[SubCall], depth: int) -> str:
    kinds = Counter(f"{c.kind}_query" if c.kind != "tool" else "tool" for c in calls)
    models = sorted({c.model for c in calls if c.model})
    answers = Counter(_answer_key(c) for c in calls)
    chips = ""
    if len(calls) > 1 and len(answers) < len(calls):
        chips = (
            "<span class='chips'>answers:"
            + "".join(
                f"<button type='button' class='chip' data-q='{_e(answer)}' "
                f"title='show only these'>{_e(answer) or '(empty)'} <i>&times;{n}</i></button>"
                for answer, n in answers.most_common(CHIPS)
            )
            + "</span>"
        )
    shared = _shared_start([c.prompt for c in calls])
    rows = "".join(_subcall(i, call, depth, len(shared)) for i, call in enumerate(calls, 1))
    what = ", ".join(f"{n} {k}" for k, n in kinds.items())
    start = ""
    if shared:
        start = (f"<div class='shared'>every prompt starts <q>{_e(_clip(shared, 300))}</q>; "
                 "the rows show what follows</div>")  # fmt: skip
    return (
        "<div class='subcalls'><div class='schead'>"
        f"<b>{len(calls)} sub-call{'s' if len(calls) != 1 else ''}</b>"
        f"<span>{_e(what)}{' · ' + _e(', '.join(models)) if models else ''}</span>{chips}"
        "<input type='search' class='filter' placeholder='filter prompts and answers' "
        "aria-label='filter sub-calls'><span class='shown'></span></div>"
        f"{start}<div class='sclist{' long' if len(calls) > LONG_LIST else ''}'>{rows}</div></div>"
    )


def _answer_key(call: SubCall) -> str:
    """A sub-call's answer as its chip names it: one line, clipped."""
    return _clip(" ".join(call.response.split()), 60)


def _shared_start(prompts: list[str]) -> str:
    """The words every prompt of a batch starts with, when there are enough of them to hide
    what tells the prompts apart."""
    if len(prompts) < 2:
        return ""
    shared = os.path.commonprefix(prompts)  # noqa: RUF071 (characters, not paths)
    if len(shared) < min(len(p) for p in prompts):
        shared = shared[: max(shared.rfind(" "), shared.rfind("\n")) + 1]
    return shared if len(shared) >= SHARED_START else ""


def _subcall(index: int, call: SubCall, depth: int, skip: int = 0) -> str:
    kind = "tool" if call.kind == "tool" else call.kind
    inner = (
        f"<div class='lbl'>prompt · {len(call.prompt):,} characters</div>"
        f"<pre>{_e(call.prompt)}</pre>"
        f"<div class='lbl'>answer · {_e(call.model or '?')} · depth {call.depth}</div>"
        f"<pre>{_e(call.response)}</pre>"
    )
    if call.child is not None:
        inner += _child(call.child, depth + 1)
    badge = _badge("child", "child") if call.child is not None else ""
    return (
        f"<details class='sc' data-a='{_e(_answer_key(call))}'><summary>"
        f"<span class='i'>{index}</span>"
        f"<span class='k'>{_e(kind)}</span>"
        f"<span class='p'>{'…' if skip else ''}"
        f"{_e(_clip(' '.join(call.prompt[skip:].split()), PREVIEW))}</span>"
        f"<span class='a'>{badge}{_e(_clip(' '.join(call.response.split()), PREVIEW))}</span>"
        f"</summary><div class='scbody'>{inner}</div></details>"
    )


def _child(run: Run, depth: int) -> str:
    outcome = run.outcome
    used = run.used
    head = (
        f"<div class='childhead'><b>child RLM</b> at depth {run.depth or depth} · "
        f"{_e(run.model or '?')} · {_e(outcome.title)} · {_count(len(run.turns), 'turn')} · "
        f"{used.tokens:,} tokens · ${used.cost:.4f}</div>"
    )
    if depth > NESTED:
        return (
            f"<div class='child d{min(depth, 3)}'>{head}<div class='empty'>deeper levels "
            "are not drawn</div></div>"
        )
    turns = "".join(_turn(t, "", None, depth) for t in run.turns)
    return f"<div class='child d{min(depth, 3)}'>{head}{turns}</div>"


# ----------------------------------------------------------------------------- helpers


def _badge(kind: str, label: str | None = None) -> str:
    return f"<span class='badge b-{kind}'>{_e(label or kind.replace('-', ' '))}</span>"


def _highlight(code: str) -> str:
    return highlight(code, PythonLexer(), HtmlFormatter(nowrap=True)).rstrip("\n")


@cache
def _code_style() -> str:
    rules = HtmlFormatter(style="one-dark").get_style_defs("pre.code").splitlines()
    return "\n".join(rule for rule in rules if rule.startswith("pre.code"))


@cache
def _asset(name: str) -> str:
    return files("functions.viewer").joinpath(name).read_text(encoding="utf-8")


def _seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'s' if n != 1 else ''}"


def _clip(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _nothing(why: str = "Nothing to show.") -> str:
    return f"<div class='empty'>{_e(why)}</div>"


def _e(value: Any) -> str:
    return html.escape(text(value), quote=True)

"""Reading the root model's reply: its ```repl code blocks and a FINAL(...) / FINAL_VAR(...).

Both functions are total: any text in, a value out, never an exception.

Decisions:
- Fences follow Markdown: three or more backticks (or tildes) on a line of their own, at any
  indentation, with an info string; the block ends at a line of at least as many of the same
  character and nothing else. A longer fence (````repl) may hold ``` lines inside, and
  backticks within a line (`s = "```"`) never open or close a block.
- ```repl blocks are the code. Only when a reply has none are ```python (py, python3) blocks
  taken instead: some models ignore the fence name they were taught, but a reply that has repl
  blocks uses python blocks for examples.
- A block still open at the end of the reply runs: models often omit the closing fence when
  the code ends their reply. Code cut off mid-way fails in the REPL, and the model sees why.
- FINAL(...) and FINAL_VAR(...) count only outside code blocks, at the start of a line. The
  first well-formed one wins. A FINAL( never closed is no answer: the reply was likely cut off.
"""

from __future__ import annotations

import keyword
import re
import textwrap
from dataclasses import dataclass
from typing import Literal

_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*([^\n`]*?)[ \t]*$", re.MULTILINE)
_FINAL = re.compile(r"^[ \t]*FINAL(_VAR)?[ \t]*\(", re.MULTILINE)
_PAREN = re.compile(r"[()]")
_LINE_END_PAREN = re.compile(r"\)[ \t]*(?=\n|\Z)")
_REPL = frozenset({"repl"})
_PYTHON = frozenset({"python", "py", "python3", "py3"})
_QUOTES = ('"""', "'''", '"', "'")
_MAX_CANDIDATES = 32  # bounds the work on a pathological reply full of "FINAL("


@dataclass(frozen=True)
class Final:
    kind: Literal["text", "var"]  # FINAL(text) or FINAL_VAR(name)
    value: str  # the answer text, or the variable's name


@dataclass(frozen=True)
class _Block:
    lang: str
    start: int  # where the opening fence line starts
    end: int  # just past the closing fence line (or the end of the text)
    code: str
    closed: bool


def _normalize(text: object) -> str:
    if not isinstance(text, str):
        return ""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _blocks(text: str) -> list[_Block]:
    """Every fenced block of (normalized) `text`, in order."""
    found: list[_Block] = []
    pos = 0
    while (opened := _FENCE.search(text, pos)) is not None:
        fence = opened.group(1)
        info = opened.group(2).split()
        lang = info[0].lower() if info else ""
        body_start = min(opened.end() + 1, len(text))
        closer = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", re.MULTILINE)
        closed = closer.search(text, body_start)
        if closed is None:
            found.append(_Block(lang, opened.start(), len(text), text[body_start:], False))
            return found
        found.append(
            _Block(lang, opened.start(), closed.end(), text[body_start : closed.start()], True)
        )
        pos = closed.end()
    return found


def find_code_blocks(text: str) -> list[str]:
    """The code of each ```repl block (or, with none, each ```python block), dedented, ending
    in one newline."""
    return [segment.text for segment in segments(text) if segment.runs]


@dataclass(frozen=True)
class Segment:
    """A piece of a reply: prose, or a fenced block (`runs`: one `find_code_blocks` returns)."""

    text: str
    fenced: bool = False
    runs: bool = False
    lang: str = ""


def segments(text: str) -> list[Segment]:
    """`text` cut into prose and fenced blocks, in order, for showing a reply with its code."""
    text = _normalize(text)
    blocks = _blocks(text)
    chosen = _REPL if any(b.lang in _REPL for b in blocks) else _PYTHON
    parts, pos = [], 0
    for block in blocks:
        if block.start > pos:
            parts.append(Segment(text[pos : block.start]))
        runs = block.lang in chosen and bool(block.code.strip())
        code = _tidy(block.code) if runs else block.code
        parts.append(Segment(code, fenced=True, runs=runs, lang=block.lang))
        pos = block.end
    if pos < len(text):
        parts.append(Segment(text[pos:]))
    return parts


def _tidy(code: str) -> str:
    return textwrap.dedent(code).strip("\n") + "\n"


def _prose(text: str) -> str:
    """`text` with every code block blanked out (line breaks kept, so lines stay lines)."""
    parts, pos = [], 0
    for block in _blocks(text):
        parts.append(text[pos : block.start])
        parts.append("\n")
        pos = block.end
    parts.append(text[pos:])
    return "".join(parts)


def find_final(text: str) -> Final | None:
    """The first well-formed FINAL(answer) or FINAL_VAR(name) outside code, at a line's start."""
    prose = _prose(_normalize(text))
    pairs: dict[int, int] | None = None
    for seen, match in enumerate(_FINAL.finditer(prose)):
        if seen == _MAX_CANDIDATES:
            break
        if match.group(1):
            found = _final_var(prose, match.end())
        else:
            pairs = _paren_pairs(prose) if pairs is None else pairs
            value = _final_text(prose, match.end(), pairs.get(match.end() - 1))
            found = Final("text", value) if value is not None else None
        if found is not None:
            return found
    return None


def _final_var(prose: str, start: int) -> Final | None:
    close = prose.find(")", start)
    if close < 0:
        return None
    name = prose[start:close].strip().strip("'\"`").strip()
    if not name.isidentifier() or keyword.iskeyword(name):
        return None
    return Final("var", name)


def _final_text(prose: str, start: int, close: int | None) -> str | None:
    """The answer in FINAL(...) whose "(" is just before `start` and matched at `close`.

    Prefer the matching parenthesis when it ends its line; an answer with unbalanced
    parentheses ("FINAL(so :) yes)") ends at the first ")" closing a line after it instead.
    """
    quoted = _quoted(prose, start)
    if quoted is not None:
        return quoted
    if close is not None and _ends_line(prose, close + 1):
        return _unquote(prose[start:close].strip())
    line_end = _LINE_END_PAREN.search(prose, close if close is not None else start)
    if line_end is not None:
        return _unquote(prose[start : line_end.start()].strip())
    return _unquote(prose[start:close].strip()) if close is not None else None


def _quoted(prose: str, start: int) -> str | None:
    """FINAL("...") and friends: the text between the quotes, parentheses and all."""
    head = prose[start : start + 64].lstrip()
    quote = next((q for q in _QUOTES if head.startswith(q)), None)
    if quote is None:
        return None
    opened = prose.index(quote, start) + len(quote)
    closing = re.compile(rf"(?<!\\){re.escape(quote)}[ \t]*\)")
    match = closing.search(prose, opened)
    if match is None or not _ends_line(prose, match.end()):
        return None
    return prose[opened : match.start()]


def _paren_pairs(text: str) -> dict[int, int]:
    """The index of each "(" that is closed, mapped to the index of its ")"."""
    pairs, stack = {}, []
    for match in _PAREN.finditer(text):
        if match.group() == "(":
            stack.append(match.start())
        elif stack:
            pairs[stack.pop()] = match.start()
    return pairs


def _ends_line(text: str, pos: int) -> bool:
    newline = text.find("\n", pos)
    return not text[pos : newline if newline >= 0 else len(text)].strip()


def _unquote(value: str) -> str:
    for quote in _QUOTES:
        if len(value) >= 2 * len(quote) and value.startswith(quote) and value.endswith(quote):
            return value[len(quote) : -len(quote)]
    return value

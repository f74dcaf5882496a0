"""Reading the root model's reply: its ```repl code blocks and a FINAL(...) / FINAL_VAR(...).

Both functions are total: any text in, a value out, never an exception.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A fence opens a line (after optional indentation) and names the language; it closes with
# at least as many backticks on a line of its own. An unclosed block at the end still counts:
# models cut off by their output limit often omit the closing fence.
_OPEN = re.compile(r"^[ \t]*(`{3,})[ \t]*(repl|python|py)?[ \t]*$", re.MULTILINE)
_FINAL = re.compile(r"^[ \t]*FINAL(_VAR)?\(", re.MULTILINE)


@dataclass(frozen=True)
class Final:
    kind: str  # "text" for FINAL(...), "var" for FINAL_VAR(name)
    value: str


def _blocks(text: str) -> list[tuple[str, int, int, str]]:
    """(language, start, end, code) of every fenced block, in order."""
    text = text.replace("\r\n", "\n")
    found, pos = [], 0
    while True:
        opened = _OPEN.search(text, pos)
        if opened is None:
            return found
        fence, lang = opened.group(1), opened.group(2) or ""
        body_start = opened.end() + 1
        close = re.compile(rf"^[ \t]*{fence}`*[ \t]*$", re.MULTILINE).search(text, body_start)
        end = close.start() if close else len(text)
        found.append((lang, opened.start(), close.end() if close else len(text),
                      text[body_start:end]))  # fmt: skip
        pos = close.end() if close else len(text)


def find_code_blocks(text: str) -> list[str]:
    """The code of each ```repl block. With no repl block, ```python blocks are taken instead,
    since some models ignore the fence name they were taught."""
    blocks = _blocks(text)
    chosen = [code for lang, *_, code in blocks if lang == "repl"]
    if not chosen:
        chosen = [code for lang, *_, code in blocks if lang in ("python", "py")]
    return [_dedent(code) for code in chosen if code.strip()]


def _dedent(code: str) -> str:
    lines = code.split("\n")
    indents = [len(line) - len(line.lstrip()) for line in lines if line.strip()]
    cut = min(indents, default=0)
    return "\n".join(line[cut:] for line in lines).strip("\n") + "\n"


def find_final(text: str) -> Final | None:
    """FINAL(answer) or FINAL_VAR(name) written outside code blocks, at the start of a line."""
    text = text.replace("\r\n", "\n")
    outside, pos = [], 0
    for _, start, end, _ in _blocks(text):
        outside.append(text[pos:start])
        pos = end
    outside.append(text[pos:])
    prose = "\n".join(outside)
    match = _FINAL.search(prose)
    if match is None:
        return None
    inner = _balanced(prose, match.end())
    if match.group(1):
        name = inner.strip().strip("'\"` ")
        return Final("var", name) if name.isidentifier() else None
    return Final("text", _unquote(inner.strip()))


def _balanced(text: str, start: int) -> str:
    """The text up to the parenthesis that closes the one before `start` (or to the end)."""
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return text[start:].rstrip().removesuffix(")")


def _unquote(value: str) -> str:
    for quote in ('"""', "'''", '"', "'"):
        if len(value) >= 2 * len(quote) and value.startswith(quote) and value.endswith(quote):
            return value[len(quote) : -len(quote)]
    return value

"""What the root model is told: how the REPL works, how to decompose, how to finish."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

CHUNK_CHARS = 100_000  # the most one sub-call is advised to read, however large its window
SAFE_CHARS_PER_TOKEN = 3  # code, digits and most languages but English take more than 4
QUESTION_TOKENS = 1_000  # room for the question and instructions around a chunk
MIN_CHUNK_CHARS = 1_000

_SYSTEM = """\
You are answering a question about a context that is much too large to read at once. The \
context is not in this conversation. It is loaded in a Python REPL as the variable `context` \
(a str, a list or a dict). You work by writing Python code that the REPL runs. You never see \
the context itself, only what your code prints, and printed output longer than \
{output_chars:,} characters per cell is cut off. Print sizes, counts, samples and short \
findings, not whole documents.

Each reply holds exactly one code block, fenced like this:
```repl
print(type(context), len(context))
```
Variables, functions and imports stay defined from one block to the next. The standard \
library, numpy, pandas and regex are available; there is no network and no file system.

What the REPL gives you:
- `llm_query(prompt, model=None) -> str`: one question to a language model{sub_model_note}. \
One prompt fits at most {chunk_chars:,} characters of context with room for your question, \
so put only the slice of context it needs into the prompt.
- `llm_query_batched(prompts, model=None) -> list[str]`: many questions at once; they run \
concurrently and the answers come back in the same order. Use it instead of a loop of \
llm_query calls.
{rlm_lines}- `SHOW_VARS()`: prints the variables you have defined so far.
- `answer`: a dict with keys "content" and "ready"; see below.

How to work:
1. Look before anything else: the type and length of `context`, how it is structured, and a \
few short samples.
2. Narrow it down with code: search, regular expressions, splitting, filtering. Code is \
cheaper than sub-calls, so discard what cannot matter first.
3. Cut what is left into chunks of at most {chunk_chars:,} characters and ask the sub-model \
about every chunk with one `llm_query_batched` call. Keep its answers in variables and \
combine them with code, or with one more query over the collected answers.
4. Check the result (print it) before you finish.

How to finish: in a repl block, set `answer["content"]` to the final answer as a str and then \
`answer["ready"] = True`; the run ends after that block. Writing FINAL(your answer) on its own \
line outside any code block also ends the run, and so does FINAL_VAR(name), which answers with \
the value of the REPL variable `name`. Do not answer before your code has looked at the \
context.{depth_note}"""

_RLM_LINES = """\
- `rlm_query(prompt) -> str`: gives a sub-problem to a child RLM. The child gets `prompt` as \
its own `context` in its own REPL and can split the work up again. Use it for a part that \
needs several steps of its own, where a single llm_query would not do.
- `rlm_query_batched(prompts) -> list[str]`: several child RLMs, run concurrently.
"""

_RLM_LINES_AT_MAX_DEPTH = """\
- `rlm_query(prompt)` and `rlm_query_batched(prompts)`: at this depth they are plain \
llm_query calls, with no REPL of their own.
"""


def chunk_chars(window_tokens: int, output_tokens: int | None = None) -> int:
    """Characters of context per sub-call that fit the sub-model's window (in tokens) with room
    for the question and its reply (the reply's cap, at most a quarter of the window)."""
    room = QUESTION_TOKENS + min(output_tokens or 0, window_tokens // 4)
    fits = (window_tokens - room) * SAFE_CHARS_PER_TOKEN // 1_000 * 1_000
    return max(MIN_CHUNK_CHARS, min(CHUNK_CHARS, fits))


def system_prompt(
    max_depth: int,
    depth: int,
    sub_model: str | None,
    output_chars: int,
    chunk_chars: int = CHUNK_CHARS,
) -> str:
    """The root's instructions. Mentions the child RLMs only where they exist (depth < max);
    `chunk_chars` (from `chunk_chars()`) is the slice of context one sub-call is told fits."""
    sub_model_note = f" (`{sub_model}` unless you name another)" if sub_model else ""
    depth_note = (
        f"\n\nYou are a child RLM at depth {depth} of at most {max_depth}: your `context` is the "
        "task your parent gave you."
        if depth > 0
        else ""
    )
    return _SYSTEM.format(
        output_chars=output_chars,
        chunk_chars=chunk_chars,
        sub_model_note=sub_model_note,
        rlm_lines=_RLM_LINES if depth < max_depth else _RLM_LINES_AT_MAX_DEPTH,
        depth_note=depth_note,
    )


@dataclass(frozen=True)
class Remaining:
    """What a run has left as a turn starts, told to the model on every turn."""

    turns: int
    usd: float | None = None
    tokens: int | None = None
    seconds: float | None = None

    def line(self) -> str:
        if self.turns == 1:
            text = (
                'This is your last turn: finish in this reply with answer["ready"] = True '
                "or FINAL(your answer)."
            )
        else:
            text = f"You have {self.turns} turns left."
        budget = []
        if self.usd is not None:
            budget.append(f"${max(0.0, self.usd):.4f}")
        if self.tokens is not None:
            budget.append(f"{max(0, self.tokens):,} tokens")
        if self.seconds is not None:
            budget.append(f"{max(0.0, self.seconds):.0f} s")
        if budget:
            text += f" Budget left: {', '.join(budget)}."
        return text


def first_user_message(
    query: str,
    context_type: str,
    context_length: int,
    context_chunk_lengths: Sequence[int],
    remaining: Remaining | None = None,
) -> str:
    """The first turn: what the context is (type, size, parts), the question, what is left."""
    shape = f"`context` is a {context_type} of {context_length:,} characters in total"
    if len(context_chunk_lengths) > 1:
        shown = ", ".join(f"{n:,}" for n in context_chunk_lengths[:20])
        more = ", ..." if len(context_chunk_lengths) > 20 else ""
        shape += f", in {len(context_chunk_lengths):,} parts of lengths [{shown}{more}]"
    left = f" {remaining.line()}" if remaining is not None else ""
    return (
        f"{shape}.\n\nQuestion: {query}\n\n"
        "You have not looked at the context yet. Start by exploring it in the REPL, and give "
        f"the final answer only once your code has found it.{left}"
    )


def iteration_user_message(
    outputs: Sequence[str],
    remaining: Remaining | None = None,
    cut_off: bool = False,
    repeated: bool = False,
) -> str:
    """A continuing turn: what each cell of the last reply printed (already formatted), and
    what the run has left. `cut_off`: the reply ended at the output cap; `repeated`: its code
    was the previous reply's again."""
    left = f" {remaining.line()}" if remaining is not None else ""
    cut = ""
    if cut_off:
        cut += (
            "Your reply was cut off at the output limit: keep replies short, one small code "
            "block each.\n\n"
        )
    if repeated:
        cut += (
            "Your reply ran the same code as the one before it. Do not send it again: change "
            "the approach, or answer with what you have.\n\n"
        )
    if not outputs:
        return (
            f"{cut}Your reply had no ```repl block and no final answer. Write one ```repl block "
            f'that moves toward the answer, or finish with answer["ready"] = True.{left}'
        )
    if len(outputs) == 1:
        shown = f"REPL output:\n{outputs[0]}"
    else:
        shown = "\n\n".join(
            f"REPL output of block {i}:\n{text}" for i, text in enumerate(outputs, 1)
        )
    return f"{cut}{shown}\n\nContinue with the next ```repl block, or finish.{left}"


def final_request_message() -> str:
    """After the last turn: one more chance to answer."""
    return (
        "You have no turns left. Reply now with the final answer, using what you have found "
        "so far, as FINAL(your answer) on a line of its own, or FINAL_VAR(name) for a REPL "
        "variable that holds it. Do not write code."
    )


def format_cell_output(stdout: str, stderr: str, error: str | None, limit_chars: int) -> str:
    """A cell's output as the model sees it, at most about `limit_chars` characters.

    Short sections are kept whole and long ones share what is left: an error stays visible
    under a flood of prints. Cut text is replaced by a marker saying how much is missing.
    """
    sections: list[tuple[str, str, bool]] = []  # (label, text, keep the end rather than both)
    if stdout.strip():
        sections.append(("", stdout.rstrip("\n"), False))
    if stderr.strip() and not (error and error.strip() in stderr):
        sections.append(("[stderr]\n", stderr.rstrip(), True))
    if error and error.strip():
        sections.append(("[error]\n", error.rstrip(), True))
    if not sections:
        return "(no output: print what you want to see)"
    budgets, left = {}, max(0, limit_chars)
    for rank, i in enumerate(sorted(range(len(sections)), key=lambda i: len(sections[i][1]))):
        budgets[i] = min(len(sections[i][1]), left // (len(sections) - rank))
        left -= budgets[i]
    return "\n".join(
        label + _clip(text, budgets[i], tail_only)
        for i, (label, text, tail_only) in enumerate(sections)
    )


def _clip(text: str, budget: int, tail_only: bool) -> str:
    cut = len(text) - budget
    if cut <= 0:
        return text
    marker = f"\n[... {cut:,} characters cut here; print less or summarize ...]\n"
    if tail_only:
        return marker.lstrip("\n") + text[len(text) - budget :]
    head = budget * 2 // 3
    return text[:head] + marker + text[len(text) - (budget - head) :]


def output_schema_note(schema_json: str) -> str:
    """Added to the system prompt of a run whose answer must match a JSON Schema."""
    return (
        "The answer must be a JSON value that matches this JSON Schema:\n"
        f"```json\n{schema_json}\n```\n"
        'Build that value in the REPL and set answer["content"] to the value itself (a dict, '
        'list, str, number or bool, not text describing it), then answer["ready"] = True. '
        "The answer is checked against the schema when you set it."
    )


def schema_repair_message(problems: Sequence[str], repairs_left: int) -> str:
    """After an answer that does not match the schema: what is wrong, and one turn to fix it."""
    listed = "\n".join(f"- {p}" for p in problems)
    turns = "This is your last chance" if repairs_left <= 1 else f"You have {repairs_left} tries"
    return (
        f"Your answer does not match the required JSON Schema:\n{listed}\n\n{turns} to fix it: "
        'in one ```repl block, set answer["content"] to the whole corrected value (not only the '
        'part that changed) and answer["ready"] = True.'
    )

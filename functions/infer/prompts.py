"""What the root model is told: how the REPL works, how to decompose, how to finish."""

from __future__ import annotations

_SYSTEM = """\
You answer a question about a context that is far too large to read at once. The context is \
not in this conversation: it is loaded in a Python REPL as the variable `context`. You work by \
writing Python that the REPL runs; you see only what the code prints, cut off past \
{output_chars} characters per cell, so print summaries and samples, not whole texts.

Write exactly one block per reply, fenced like this:
```repl
print(type(context), len(context))
```
The REPL keeps variables, functions and imports from one block to the next. The standard \
library, numpy, pandas and regex are available; there is no network and no file system.

Functions in the REPL:
- `llm_query(prompt, model=None) -> str`: ask a language model{sub_model_note} one question. \
It reads about 100,000 characters well; put the piece of context it needs in the prompt.
- `llm_query_batched(prompts, model=None) -> list[str]`: many questions at once, answered \
concurrently and returned in order. Much faster than calling llm_query in a loop.
{rlm_lines}- `SHOW_VARS()`: list the variables you have made.

How to work:
1. Look first: the type and length of `context`, its structure, a few samples.
2. Narrow with code: search, regex, split, filter; keep only the parts that matter.
3. Split what is left into chunks sized for the sub-model and use `llm_query_batched` over \
them; then combine the answers in code (or with one more llm_query).
4. Check the result before you finish.

How to finish: in a repl block set `answer["content"] = <the final answer as a str>` and \
`answer["ready"] = True`. (Writing FINAL(your answer) or FINAL_VAR(variable_name) on its own \
line outside a code block also works.) Do not finish before you have looked at the context."""

_RLM_LINES = """\
- `rlm_query(prompt) -> str`: hand a sub-problem to a child RLM that gets `prompt` as its \
own `context` and REPL, and can decompose it in turn. Use it for sub-problems too large or \
complex for one llm_query.
- `rlm_query_batched(prompts) -> list[str]`: several child RLMs, run concurrently.
"""

_RLM_LINES_AT_DEPTH = """\
- `rlm_query(prompt)` and `rlm_query_batched(prompts)` exist, but at this depth they are \
plain llm_query calls.
"""


def system_prompt(max_depth: int, depth: int, sub_model: str | None, output_chars: int) -> str:
    note = f" (`{sub_model}` by default)" if sub_model else ""
    rlm_lines = _RLM_LINES if depth < max_depth else _RLM_LINES_AT_DEPTH
    return _SYSTEM.format(output_chars=output_chars, sub_model_note=note, rlm_lines=rlm_lines)


def first_user_message(
    query: str, context_type: str, context_length: int, chunk_lengths: list[int]
) -> str:
    shape = f"`context` is a {context_type} of {context_length:,} characters"
    if len(chunk_lengths) > 1:
        shown = ", ".join(f"{n:,}" for n in chunk_lengths[:20])
        more = ", ..." if len(chunk_lengths) > 20 else ""
        shape += f" in {len(chunk_lengths)} parts of lengths [{shown}{more}]"
    return (
        f"{shape}.\n\nQuestion: {query}\n\n"
        "You have not looked at the context yet. Start by exploring it in the REPL; "
        "answer only once your code has found the answer."
    )


def iteration_user_message(outputs: list[str], iteration: int) -> str:
    if not outputs:
        return (
            "Your reply had no ```repl block and no final answer. Write one ```repl block "
            "that moves toward the answer, or finish with answer['ready'] = True."
        )
    shown = "\n\n".join(f"[cell {i + 1} output]\n{text}" for i, text in enumerate(outputs))
    return f"{shown}\n\nTurn {iteration} done. Continue with the next ```repl block, or finish."


def final_request_message() -> str:
    return (
        "You have used all your turns. Reply now with the final answer on one line as "
        "FINAL(your answer), using what you have found so far."
    )


def format_cell_output(stdout: str, stderr: str, error: str | None, limit_chars: int) -> str:
    parts = [stdout.rstrip("\n")] if stdout.strip() else []
    if stderr.strip() and not (error and error.strip() in stderr):
        parts.append(f"[stderr]\n{stderr.rstrip()}")
    if error:
        parts.append(f"[error]\n{error.rstrip()}")
    text = "\n".join(parts) or "(no output)"
    if len(text) > limit_chars:
        cut = len(text) - limit_chars
        text = text[:limit_chars] + f"\n[... {cut:,} more characters not shown ...]"
    return text

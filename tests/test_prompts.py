"""What the root model is told, and how a cell's output is shown to it."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from functions.infer import prompts
from functions.infer.parsing import find_code_blocks, find_final
from functions.testing.scripted_model import ModelRequest


def test_system_prompt_teaches_the_repl() -> None:
    text = prompts.system_prompt(max_depth=1, depth=0, sub_model="small-model", output_chars=20_000)
    assert "REPL" in text
    for name in (
        "context",
        "llm_query(",
        "llm_query_batched(",
        "rlm_query(",
        "rlm_query_batched(",
        "SHOW_VARS()",
        'answer["content"]',
        'answer["ready"] = True',
        "FINAL(",
        "FINAL_VAR(",
        "```repl",
        "len(context)",
        "20,000",
        "100,000",
        "small-model",
    ):
        assert name in text, name
    assert "one code block" in text


def test_the_system_prompt_is_what_the_scripted_model_recognizes_as_a_root() -> None:
    text = prompts.system_prompt(1, 0, None, 20_000)
    assert ModelRequest("m", [{"role": "system", "content": text}]).is_root


def test_the_example_block_is_not_mistaken_for_an_answer() -> None:
    text = prompts.system_prompt(1, 0, None, 20_000)
    assert find_final(text) is None
    assert find_code_blocks(text) == ["print(type(context), len(context))\n"]


def test_child_rlms_only_below_max_depth() -> None:
    below = prompts.system_prompt(max_depth=2, depth=1, sub_model=None, output_chars=1000)
    at_max = prompts.system_prompt(max_depth=1, depth=1, sub_model=None, output_chars=1000)
    assert "child RLM" in below and "own REPL" in below
    assert "plain llm_query calls" in at_max
    assert "depth 1 of at most 1" in at_max
    assert "depth" not in prompts.system_prompt(1, 0, None, 1000).split("How to finish")[1]


def test_first_user_message_states_the_context() -> None:
    text = prompts.first_user_message("Who wins?", "str", 1_234_567, [1_234_567])
    assert "Who wins?" in text and "a str of 1,234,567 characters" in text
    assert "not looked at the context" in text
    assert "parts" not in text


def test_first_user_message_lists_parts() -> None:
    text = prompts.first_user_message("q", "list", 600, [10] * 30)
    assert "30 parts" in text and "..." in text
    assert text.count("10") >= 20


def test_iteration_message_carries_the_outputs() -> None:
    one = prompts.iteration_user_message(["hello"], prompts.Remaining(turns=4))
    assert "hello" in one and "You have 4 turns left." in one and "Budget" not in one
    two = prompts.iteration_user_message(["a", "b"], prompts.Remaining(turns=1))
    assert "block 1" in two and "block 2" in two
    assert "This is your last turn" in two and 'answer["ready"] = True' in two
    nothing = prompts.iteration_user_message([], None)
    assert "no ```repl block" in nothing and "left" not in nothing


def test_every_turn_states_the_budget_left() -> None:
    left = prompts.Remaining(turns=3, usd=0.123456, tokens=45_000, seconds=229.6)
    text = prompts.iteration_user_message(["x"], left)
    assert "You have 3 turns left. Budget left: $0.1235, 45,000 tokens, 230 s." in text
    first = prompts.first_user_message("q", "str", 10, [10], left)
    assert first.endswith(left.line())
    spent = prompts.Remaining(turns=2, usd=-0.5, tokens=-3, seconds=-1.0)
    assert "$0.0000, 0 tokens, 0 s" in spent.line()  # over budget reads as nothing left


def test_a_cut_off_or_repeated_reply_is_named() -> None:
    text = prompts.iteration_user_message(["x"], None, cut_off=True, repeated=True)
    assert "cut off at the output limit" in text
    assert "same code as the one before" in text


@pytest.mark.parametrize(
    ("window", "output", "chars"),
    [
        (128_000, 8192, 100_000),  # a large window: the advice's cap
        (16_384, 8192, 33_000),  # (16,384 - 1,000 - 4,096) tokens x 3, to the thousand
        (8_192, 8192, 15_000),
        (4_096, None, 9_000),
        (1_000, 8192, 1_000),  # too small to fit anything: the floor
    ],
)
def test_chunk_advice_fits_the_sub_models_window(window: int, output: int, chars: int) -> None:
    assert prompts.chunk_chars(window, output) == chars
    text = prompts.system_prompt(1, 0, None, 20_000, chunk_chars=chars)
    assert f"chunks of at most {chars:,} characters" in text
    assert f"at most {chars:,} characters of context" in text


def test_final_request() -> None:
    text = prompts.final_request_message()
    assert "FINAL(" in text and "FINAL_VAR(" in text


# ----------------------------------------------------------------------------- cell output


def test_short_output_is_kept_whole() -> None:
    assert prompts.format_cell_output("hello\n", "", None, 100) == "hello"
    assert prompts.format_cell_output("", "", None, 100).startswith("(no output")


def test_error_and_stderr_are_labelled() -> None:
    text = prompts.format_cell_output("out\n", "a warning\n", "Traceback...\nValueError: x", 1000)
    assert text == "out\n[stderr]\na warning\n[error]\nTraceback...\nValueError: x"


def test_an_error_already_on_stderr_is_shown_once() -> None:
    error = "Traceback...\nNameError: y"
    text = prompts.format_cell_output("", f"{error}\n", error, 1000)
    assert text.count("NameError") == 1


def test_long_stdout_is_cut_with_a_visible_marker_keeping_both_ends() -> None:
    stdout = "".join(f"line {i:05d}\n" for i in range(10_000))
    text = prompts.format_cell_output(stdout, "", None, 2_000)
    assert text.startswith("line 00000")
    assert text.endswith("line 09999")
    cut = int(re.search(r"\[\.\.\. ([\d,]+) characters cut", text).group(1).replace(",", ""))
    assert cut == len(stdout.rstrip("\n")) - 2_000
    assert len(text) < 2_100


def test_an_error_stays_visible_under_a_flood_of_prints() -> None:
    error = "Traceback (most recent call last):\n  ...\nZeroDivisionError: division by zero"
    text = prompts.format_cell_output("x" * 100_000, "", error, 1_000)
    assert text.endswith("ZeroDivisionError: division by zero")
    assert len(text) < 1_100


def test_a_long_traceback_keeps_its_end() -> None:
    error = "Traceback\n" + "  frame\n" * 5_000 + "RecursionError: too deep"
    text = prompts.format_cell_output("", "", error, 500)
    assert text.startswith("[error]\n[... ") and text.endswith("RecursionError: too deep")


@settings(max_examples=200, deadline=None)
@given(st.text(), st.text(), st.none() | st.text(), st.integers(min_value=0, max_value=5_000))
def test_output_is_bounded(stdout: str, stderr: str, error: str | None, limit: int) -> None:
    text = prompts.format_cell_output(stdout, stderr, error, limit)
    assert len(text) <= limit + 3 * 80 + 20  # the text, plus a marker and label per section


@pytest.mark.parametrize(("max_depth", "depth"), [(0, 0), (1, 0), (2, 1), (2, 2)])
def test_no_placeholder_is_left_unfilled(max_depth: int, depth: int) -> None:
    text = prompts.system_prompt(max_depth, depth, sub_model="s", output_chars=5000)
    assert not re.search(r"\{\w*\}", text)

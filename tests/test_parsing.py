"""Reading model replies: code blocks and final answers, on well-formed and hostile text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from functions.infer.parsing import Final, find_code_blocks, find_final

# ----------------------------------------------------------------------------- code blocks


def test_repl_blocks_in_order() -> None:
    reply = "First:\n```repl\nx = 1\n```\nthen\n```repl\nprint(x)\n```\n"
    assert find_code_blocks(reply) == ["x = 1\n", "print(x)\n"]


def test_python_blocks_only_when_there_is_no_repl_block() -> None:
    assert find_code_blocks("```python\nprint(1)\n```") == ["print(1)\n"]
    assert find_code_blocks("```py\nprint(1)\n```") == ["print(1)\n"]
    mixed = "Example:\n```python\nexample()\n```\nNow:\n```repl\nreal()\n```"
    assert find_code_blocks(mixed) == ["real()\n"]


def test_other_languages_and_bare_fences_are_not_code() -> None:
    reply = '```json\n{"a": 1}\n```\n```\nplain\n```\n```text\nhello\n```'
    assert find_code_blocks(reply) == []


def test_a_block_after_another_language_is_found() -> None:
    reply = "```json\n{}\n```\n```repl\nprint(2)\n```"
    assert find_code_blocks(reply) == ["print(2)\n"]


def test_crlf_and_lone_cr() -> None:
    assert find_code_blocks("```repl\r\nx = 1\r\ny = 2\r\n```\r\n") == ["x = 1\ny = 2\n"]
    assert find_code_blocks("```repl\rx = 1\r```") == ["x = 1\n"]


def test_indented_fences_are_dedented() -> None:
    reply = "1. Step one:\n    ```repl\n    for i in range(2):\n        print(i)\n    ```\n"
    assert find_code_blocks(reply) == ["for i in range(2):\n    print(i)\n"]


def test_info_string_case_and_trailing_words() -> None:
    assert find_code_blocks("```REPL\nx = 1\n```") == ["x = 1\n"]
    assert find_code_blocks("``` repl  title\nx = 1\n```") == ["x = 1\n"]


def test_backticks_inside_a_line_do_not_close_the_block() -> None:
    code = 'fence = "```"\nprint(f"{fence}repl")\ns = """```"""'
    assert find_code_blocks(f"```repl\n{code}\n```") == [code + "\n"]


def test_a_longer_fence_holds_a_shorter_one() -> None:
    code = 'doc = """\n```\nnot a fence for this block\n```\n"""\nprint(doc)'
    assert find_code_blocks(f"````repl\n{code}\n````") == [code + "\n"]


def test_tilde_fences() -> None:
    assert find_code_blocks("~~~repl\nx = 1\n~~~") == ["x = 1\n"]


def test_unclosed_block_at_the_end_is_taken() -> None:
    assert find_code_blocks("Running:\n```repl\nprint(len(context))\n") == ["print(len(context))\n"]


def test_code_ends_in_one_newline() -> None:
    assert find_code_blocks("```repl\n\nx = 1\n\n\n```") == ["x = 1\n"]


def test_empty_blocks_are_skipped() -> None:
    assert find_code_blocks("```repl\n```\n```repl\n   \n```") == []
    assert find_code_blocks("```repl") == []


def test_no_blocks() -> None:
    assert find_code_blocks("") == []
    assert find_code_blocks("just prose, ``` in the middle of a line") == []


def test_a_single_line_fence_is_not_a_block() -> None:
    assert find_code_blocks("```repl print(1)```") == []


# ----------------------------------------------------------------------------- final answers


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("FINAL(42)", Final("text", "42")),
        ("Done.\nFINAL(The answer is 42)\n", Final("text", "The answer is 42")),
        ("  FINAL( spaced )  ", Final("text", "spaced")),
        ('FINAL("quoted")', Final("text", "quoted")),
        ("FINAL('single')", Final("text", "single")),
        ('FINAL("""tri\nple""")', Final("text", "tri\nple")),
        ("FINAL(f(x) = (a + b))", Final("text", "f(x) = (a + b)")),
        ("FINAL(one\ntwo (b)\nthree)\nbye", Final("text", "one\ntwo (b)\nthree")),
        ("FINAL(so :) yes)", Final("text", "so :) yes")),
        ("FINAL(sad :( face)", Final("text", "sad :( face")),
        ('FINAL("a (b" )', Final("text", "a (b")),
        ("FINAL(42). Thanks!", Final("text", "42")),
        ("FINAL()", Final("text", "")),
        ("FINAL_VAR(result)", Final("var", "result")),
        ("FINAL_VAR('result')", Final("var", "result")),
        ('FINAL_VAR( "result" )', Final("var", "result")),
        ("FINAL_VAR(`result`)", Final("var", "result")),
        ("\r\nFINAL(crlf)\r\n", Final("text", "crlf")),
    ],
)  # fmt: skip
def test_final_forms(reply: str, expected: Final) -> None:
    assert find_final(reply) == expected


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "no answer yet",
        "I will call FINAL(x) when done",  # not at the start of a line
        "```repl\nFINAL(42)\n```",  # inside code
        "```repl\nx = 1\nFINAL_VAR(x)\n",  # inside an unclosed block
        "FINAL(cut off by the length limit",
        "FINAL_VAR(not a name)",
        "FINAL_VAR(None)",
        "FINAL_VAR(answer['content'])",
        "FINALLY(42)",
    ],
)
def test_no_final(reply: str) -> None:
    assert find_final(reply) is None


def test_final_after_code_is_found_and_code_is_ignored() -> None:
    reply = "```repl\nprint('FINAL(wrong)')\n```\nFINAL(right)"
    assert find_final(reply) == Final("text", "right")
    assert find_code_blocks(reply) == ["print('FINAL(wrong)')\n"]


def test_the_first_well_formed_final_wins() -> None:
    assert find_final("FINAL_VAR(not valid)\nFINAL_VAR(good)\nFINAL(later)") == Final("var", "good")


def test_final_var_with_parentheses_in_code_before_it() -> None:
    reply = "```repl\nresult = f(1)\n```\nFINAL_VAR(result)"
    assert find_final(reply) == Final("var", "result")


def test_large_and_pathological_replies_are_quick() -> None:
    assert find_final("FINAL(" * 50_000) is None
    assert find_code_blocks("```repl\n" * 20_000)
    assert find_final("x\n" * 200_000 + "FINAL(end)") == Final("text", "end")


# ----------------------------------------------------------------------------- never raises

_pieces = st.sampled_from(
    [
        "```",
        "````",
        "~~~",
        "repl",
        "python",
        "\n",
        "\r\n",
        "\r",
        " ",
        "    ",
        "FINAL(",
        "FINAL_VAR(",
        ")",
        "(",
        '"',
        "'",
        '"""',
        "`",
        "x",
        "print(1)",
        "\t",
        "\\",
    ]
)
_replies = st.one_of(st.text(), st.lists(_pieces | st.text(max_size=5)).map("".join))


@settings(max_examples=400, deadline=None)
@given(_replies)
def test_parsing_never_raises(reply: str) -> None:
    blocks = find_code_blocks(reply)
    assert all(code.strip() and code.endswith("\n") for code in blocks)
    final = find_final(reply)
    assert final is None or (final.kind in ("text", "var") and isinstance(final.value, str))
    if final is not None and final.kind == "var":
        assert final.value.isidentifier()


_line_breaks = "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_code_lines = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="`~" + _line_breaks),
    min_size=1,
).filter(lambda line: line.strip() and line == line.lstrip())


@settings(max_examples=200, deadline=None)
@given(st.lists(_code_lines, min_size=1, max_size=8))
def test_repl_blocks_round_trip(lines: list[str]) -> None:
    code = "\n".join(lines)
    assert find_code_blocks(f"Intro\n```repl\n{code}\n```\nOutro") == [code + "\n"]

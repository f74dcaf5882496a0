"""The guest's scaffold (its API, `answer`, `context`) survives a cell that rebinds or deletes
it, on real wasm: the next cell has it back and the cell that rebound it says so on stderr."""

from __future__ import annotations

import uuid

import pytest

from functions.contract import ExecuteRequest, context_ref

TEXT = "the input the model must not lose"
API = [
    "llm_query",
    "llm_query_batched",
    "rlm_query",
    "rlm_query_batched",
    "SHOW_VARS",
    "FINAL_VAR",
    "FINAL",
    "SubcallError",
    "ToolError",
]


SCOPE = "scaffold-tests-scope-01"  # the run the sessions belong to


def run(runner, sid: str, code: str, state=None):
    return runner.run(
        ExecuteRequest(
            code=code,
            session_id=sid,
            state={"ref": state.ref} if state else None,
            rlm_context={"ref": context_ref(TEXT), "data": TEXT},
            scope=SCOPE,
        )
    )


@pytest.mark.parametrize("name", API)
@pytest.mark.parametrize("how", ["{name} = 'mine'", "del {name}", "def {name}(*a): return 'x'"])
def test_an_api_name_comes_back(runner, name, how):
    sid = f"scaffold-{uuid.uuid4().hex[:8]}"
    first = run(runner, sid, how.format(name=name) + f"\nprint(type({name}).__name__)"
                if not how.startswith("del") else how.format(name=name))  # fmt: skip
    assert first.error is None
    assert f"[rlm] this cell rebound {name}; restored." in first.stderr
    second = run(runner, sid, f"print(callable({name}), {name}.__name__)", first.state)
    assert second.stdout == f"True {name}\n" and second.stderr == ""


def test_the_api_works_after_it_was_restored(runner):
    sid = f"scaffold-{uuid.uuid4().hex[:8]}"
    first = run(runner, sid, "FINAL = print")
    second = run(runner, sid, "FINAL('done')", first.state)
    assert second.answer.ready and second.answer.content == "done"


@pytest.mark.parametrize("code", ["context = context.split()", "del context", "context = None"])
def test_context_comes_back(runner, code):
    sid = f"scaffold-{uuid.uuid4().hex[:8]}"
    first = run(runner, sid, code)
    assert "[rlm] this cell rebound context; restored." in first.stderr
    second = run(runner, sid, "print(context == TEXT_COPY)".replace("TEXT_COPY", repr(TEXT)))
    assert second.stdout == "True\n" and second.stderr == ""
    # and on a pod that lost the session, from the saved state
    runner.sessions.clear()
    third = run(runner, sid, "print(type(context).__name__, len(context))", first.state)
    assert third.stdout == f"str {len(TEXT)}\n"


def test_answer_comes_back_unless_it_is_still_a_dict(runner):
    sid = f"scaffold-{uuid.uuid4().hex[:8]}"
    first = run(runner, sid, "answer = '42'")
    assert "[rlm] this cell rebound answer; restored." in first.stderr
    assert first.answer is None
    second = run(runner, sid, "print(answer)", first.state)
    assert second.stdout == "{'content': None, 'ready': False}\n"
    # A new dict is a way of answering, not a rebinding.
    third = run(runner, sid, "answer = {'content': 'x', 'ready': True}", second.state)
    assert third.stderr == "" and third.answer.ready and third.answer.content == "x"


def test_own_names_are_untouched_and_nothing_is_said(runner):
    sid = f"scaffold-{uuid.uuid4().hex[:8]}"
    first = run(runner, sid, "words = context.split()\nmy_llm_query = 1\nanswer['content'] = 'a'")
    assert first.stderr == ""
    second = run(runner, sid, "print(len(words), my_llm_query, answer['content'])", first.state)
    assert second.stdout == "7 1 a\n"


def test_several_names_in_one_line_even_when_the_cell_fails(runner):
    sid = f"scaffold-{uuid.uuid4().hex[:8]}"
    first = run(runner, sid, "context = 1\nllm_query = 2\nanswer = 3\n1/0")
    assert first.error.type == "ZeroDivisionError"
    lines = [line for line in first.stderr.splitlines() if line.startswith("[rlm]")]
    assert lines == [
        "[rlm] this cell rebound llm_query, context, answer; restored. Keep your own values "
        'under other names (and answer with answer["content"] = ...).'
    ]


def test_a_cell_that_replaced_stderr_still_gets_the_line(runner):
    sid = f"scaffold-{uuid.uuid4().hex[:8]}"
    code = (
        "import sys\nclass Deaf:\n    def write(self, s):\n        raise RuntimeError('no')\n"
        "sys.stderr = Deaf()\nllm_query = 1"
    )
    first = run(runner, sid, code)
    assert first.error is None and "[rlm] this cell rebound llm_query" in first.stderr
    second = run(runner, sid, "print(llm_query.__name__)", first.state)
    assert second.stdout == "llm_query\n"


def test_a_dict_subclass_answer_is_read_with_dicts_own_methods(runner):
    sid = f"scaffold-{uuid.uuid4().hex[:8]}"
    code = (
        "class D(dict):\n    def get(self, *a):\n        raise RuntimeError('gotcha')\n"
        "answer = D(content='x', ready=True)"
    )
    first = run(runner, sid, code)
    assert first.error is None and first.answer.ready and first.answer.content == "x"
    assert "[rlm] this cell rebound answer; restored." in first.stderr  # a plain dict again


@pytest.mark.parametrize(
    "hostile",
    [
        "class S:\n    def __str__(self):\n        raise SystemExit(3)\n"
        "answer = {'content': S(), 'ready': True}",
        "class B:\n    def __bool__(self):\n        raise KeyboardInterrupt\n"
        "answer = {'content': 'x', 'ready': B()}",
    ],
)
def test_an_answer_that_cannot_be_read_is_no_answer_and_the_session_lives(runner, hostile):
    sid = f"scaffold-{uuid.uuid4().hex[:8]}"
    first = run(runner, sid, hostile)
    assert first.error is None and first.answer is None
    assert "[rlm] answer cannot be read" in first.stderr
    second = run(runner, sid, "answer['content'] = 'fine'\nanswer['ready'] = True", first.state)
    assert second.answer.ready and second.answer.content == "fine"

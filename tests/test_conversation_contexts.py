"""A conversation's contexts in the sandbox: context_0, context_1, ... by reference."""

from __future__ import annotations

import pytest

from functions.contract import ExecuteRequest, context_ref
from functions.errors import MissingRefs


def ref(value, data=False):
    return {"ref": context_ref(value), **({"data": value} if data else {})}


def turn(runner, sid, code, contexts, state=None, data=True):
    return runner.run(
        ExecuteRequest(
            code=code,
            session_id=sid,
            state={"ref": state.ref, "data": state.data} if state else None,
            rlm_context=ref(contexts[-1], data),
            rlm_contexts=[ref(c, data) for c in contexts],
        )
    )


def test_contexts_are_bound_by_index_and_not_pickled(runner):
    sid = "conv-contexts"
    first, second = "alpha " * 10, {"rows": [1, 2, 3]}
    r1 = turn(runner, sid, "seen = len(context_0)", [first])
    assert r1.error is None and "context_0" not in r1.locals
    r2 = turn(runner, sid, "print(seen, context_1['rows'], context is context_1)", [first, second],
              r1.state)  # fmt: skip
    assert r2.stdout == "60 [1, 2, 3] True\n", r2.stderr
    # The state holds `seen` but no context: another pod restores it and binds them again.
    runner.sessions.clear()
    r3 = turn(runner, sid, "print(seen, context_0[:5], sorted(context_1))", [first, second],
              r2.state)  # fmt: skip
    assert r3.stdout == "60 alpha ['rows']\n", r3.stderr
    assert len(r3.state.data or "") < 1000  # the contexts are not in the state


def test_unknown_context_ref_is_a_409_naming_it(runner):
    runner.sessions.clear()
    with pytest.raises(MissingRefs) as missing:
        turn(runner, "conv-missing", "pass", ["never sent 1", "never sent 2"], data=False)
    assert set(missing.value.missing) == {"rlm_context", "rlm_contexts"}

"""The run ledger's rules, on both stores: the same tests against memory and a real Redis."""

from __future__ import annotations

import threading

import pytest

from functions.contract import ModelUsage
from functions.errors import Conflict, Forbidden, NotFound, Unauthorized
from functions.infer.ledger import (
    ANONYMOUS,
    BudgetRefused,
    Ledger,
    LedgerUnavailable,
    MemoryStore,
    RedisStore,
    RunKey,
    event_key,
)
from functions.testing.redis_server import PASSWORD, RedisServer


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
def ledger(request, redis) -> Ledger:
    if request.param == "memory":
        return Ledger(MemoryStore())
    return Ledger(RedisStore(redis.url, PASSWORD))


PRICE = (1.0, 2.0)  # USD per million input, output tokens


def test_run_ids_are_scoped_to_their_owner(ledger):
    alice, bob = RunKey("alice", "r1"), RunKey("bob", "r1")
    ledger.open_run(alice, None, None, 60)
    ledger.open_run(bob, None, None, 60)  # the same id, another caller: another run
    with pytest.raises(Conflict):
        ledger.open_run(alice, None, None, 60)
    ledger.cancel(bob)
    assert ledger.cancelled(bob) and not ledger.cancelled(alice)
    ledger.finish_run(alice, "completed")
    with pytest.raises(NotFound):
        ledger.cancel(alice)
    ledger.open_run(alice, None, None, 60)  # a finished run's id may be used again
    assert not ledger.cancelled(alice)


def test_local_mode_cancel_needs_the_runs_token(ledger):
    key = RunKey(ANONYMOUS, "r2")
    token, _ = ledger.open_run(key, None, None, 60)
    for wrong in (None, "", "guess" * 4):
        with pytest.raises(Forbidden):
            ledger.cancel(key, wrong)
    assert not ledger.cancelled(key)
    ledger.cancel(key, token)
    assert ledger.cancelled(key)


def test_cell_tokens_work_for_the_current_cell_of_a_live_run_only(ledger):
    key = RunKey("alice", "r3")
    ledger.open_run(key, None, None, 60)
    ledger.open_cell(key, "r3", "cell-1", False, 60)
    keep_s = ledger.take_prompts(key, "r3", "cell-1", 3, cap=5)
    assert 50 < keep_s <= 60  # what the run keeps (memo, logs) lives no longer than the run
    with pytest.raises(Forbidden, match="at most 5"):
        ledger.take_prompts(key, "r3", "cell-1", 3, cap=5)
    ledger.open_cell(key, "r3", "cell-2", False, 60)
    with pytest.raises(Unauthorized, match="cell that has ended"):
        ledger.take_prompts(key, "r3", "cell-1", 1, cap=5)
    ledger.open_cell(key, "r3", "replay-1", True, 60)  # a rebuilt session's replays, alongside
    ledger.take_prompts(key, "r3", "cell-2", 1, cap=5)
    ledger.take_prompts(key, "r3", "replay-1", 1, cap=5)
    ledger.finish_run(key, "completed")
    with pytest.raises(Unauthorized, match="run that has ended"):
        ledger.take_prompts(key, "r3", "cell-2", 1, cap=5)


def test_reservations_never_let_concurrent_calls_pass_the_budget(ledger):
    """Forty threads race for a budget that covers about ten calls: the sum of what was held
    and then settled stays within it."""
    key = RunKey("alice", "r4")
    budget = 0.05
    ledger.open_run(key, budget, None, 60)
    made: list[int] = []

    def call() -> None:
        try:
            held = ledger.reserve(key, 1000, 2000, PRICE)  # at most $0.005 a call
        except BudgetRefused as refused:
            assert refused.code == "max_budget_usd"
            return
        real = ModelUsage(calls=1, input_tokens=900, output_tokens=held.output_tokens // 2)
        real.cost_usd = (900 * PRICE[0] + real.output_tokens * PRICE[1]) / 1e6
        ledger.settle(key, held, "m", real)
        made.append(1)

    threads = [threading.Thread(target=call) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spent = ledger.spent(key)["m"]
    assert 5 <= len(made) < 40 and spent.calls == len(made)
    assert spent.cost_usd <= budget + 1e-9


def test_a_reservation_caps_the_calls_output_to_what_the_budget_leaves(ledger):
    key = RunKey("alice", "r5")
    ledger.open_run(key, None, 3000, 60)
    held = ledger.reserve(key, 1000, 4096, PRICE)
    assert held.output_tokens == 2000  # 3000 tokens, 1000 of them input
    with pytest.raises(BudgetRefused, match="max_tokens") as refused:
        ledger.reserve(key, 1000, 4096, PRICE)
    assert refused.value.code == "max_tokens"
    ledger.release(key, held)
    assert ledger.reserve(key, 1000, 4096, PRICE).output_tokens == 2000


def test_children_log_memo_and_events(ledger):
    key = RunKey("alice", "r6")
    ledger.open_run(key, None, None, 60)
    ledger.start_child(key, 2)
    ledger.start_child(key, 2)
    with pytest.raises(Forbidden, match="at most 2"):
        ledger.start_child(key, 2)
    ledger.end_child(key)
    ledger.start_child(key, 2)
    ledger.log(key, "c1", {"kind": "llm"}, 60)
    ledger.log(key, "c1", {"kind": "rlm"}, 60)
    assert [e["kind"] for e in ledger.take_log(key, "c1")] == ["llm", "rlm"]
    assert ledger.take_log(key, "c1") == []
    ledger.remember(key, "call", ["a"], 60)
    ledger.remember(key, "call", ["b"], 60)
    assert [ledger.recall(key, "call") for _ in range(3)] == [["a"], ["b"], None]
    one = event_key("/src", "id-1", {"query": "q"})
    assert one == event_key("/src", "id-1", {"query": "q"})
    assert one != event_key("/other", "id-1", {"query": "q"})
    assert one != event_key("/src", "id-1", {"query": "other"})
    assert ledger.claim_event(one, 60) == ("new", None)
    assert ledger.claim_event(one, 60) == ("running", None)
    ledger.answer_event(one, ["done", {"a": 1}], 60)
    assert ledger.claim_event(one, 60) == ("answered", ["done", {"a": 1}])


def test_an_unreachable_redis_is_a_503_and_recovers(tmp_path):
    server = RedisServer(tmp_path).start()
    ledger = Ledger(RedisStore(server.url, PASSWORD, timeout_s=0.5))
    key = RunKey("alice", "r7")
    ledger.open_run(key, None, None, 60)
    server.stop()
    with pytest.raises(LedgerUnavailable) as down:
        ledger.cancelled(key)
    assert down.value.status == 503 and down.value.headers["Retry-After"]
    server.start()  # the same port, empty: the client reconnects by itself
    ledger.open_run(key, None, None, 60)
    assert not ledger.cancelled(key)
    server.stop()


def test_a_wrong_redis_password_is_unavailable_not_a_crash(redis):
    ledger = Ledger(RedisStore(redis.url, "wrong-password", timeout_s=0.5))
    with pytest.raises(LedgerUnavailable):
        ledger.cancelled(RunKey("a", "b"))

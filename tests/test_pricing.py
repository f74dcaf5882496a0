"""The price table: defaults, families of dated names, LLM_PRICES overrides, unknown models."""

from __future__ import annotations

import logging
import threading

import pytest

from functions import config
from functions.infer.pricing import DEFAULT_PRICES, PriceTable, parse_prices


def test_known_model_cost() -> None:
    table = PriceTable()
    assert table.cost("gpt-4o", 1_000_000, 0) == pytest.approx(2.5)
    assert table.cost("gpt-4o", 0, 1_000_000) == pytest.approx(10.0)
    assert table.cost("gpt-4o-mini", 2_000, 1_000) == pytest.approx((2_000 * 0.15 + 600) / 1e6)
    assert table.unpriced == set()


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("openai/gpt-4.1-mini", "gpt-4.1-mini"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("claude-opus-4-5-20251101", "claude-opus-4-5"),
        ("GPT-4O", "gpt-4o"),
    ],
)
def test_dated_and_prefixed_names_use_their_family(model: str, family: str) -> None:
    assert PriceTable().price(model) == DEFAULT_PRICES[family]


def test_a_family_needs_a_separator() -> None:
    table = PriceTable('{"gpt-4": [30, 60]}')
    assert table.price("gpt-4o") == DEFAULT_PRICES["gpt-4o"]
    assert table.price("gpt-4-0613") == (30.0, 60.0)
    assert table.price("o30") is None


def test_unknown_model_costs_nothing_and_is_flagged_once(caplog: pytest.LogCaptureFixture) -> None:
    table = PriceTable()
    with caplog.at_level(logging.WARNING, logger="rlm.pricing"):
        assert table.cost("my-local-llama", 10_000, 10_000) == 0.0
        assert table.cost("my-local-llama", 10_000, 10_000) == 0.0
    assert table.unpriced == {"my-local-llama"}
    assert table.price("my-local-llama") is None
    assert sum("my-local-llama" in r.getMessage() for r in caplog.records) == 1


def test_overrides_add_and_replace() -> None:
    table = PriceTable('{"my-local-llama": [0.1, 0.2], "gpt-4o": [1, 2]}')
    assert table.cost("my-local-llama", 1_000_000, 1_000_000) == pytest.approx(0.3)
    assert table.cost("gpt-4o", 1_000_000, 0) == pytest.approx(1.0)
    assert PriceTable(overrides={"x": (3.0, 4.0)}).price("x") == (3.0, 4.0)


def test_negative_token_counts_cost_nothing() -> None:
    assert PriceTable().cost("gpt-4o", -5, -5) == 0.0


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"m": 1}',
        '{"m": [1]}',
        '{"m": [1, 2, 3]}',
        '{"m": ["1", "2"]}',
        '{"m": [true, 1]}',
        '{"m": [-1, 1]}',
        '{"m": [NaN, 1]}',
        '{"m": [Infinity, 1]}',
        '{"m": {"input": 1, "output": 2}}',
    ],
)
def test_bad_overrides_fail_with_one_clear_line(text: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        PriceTable(text)
    assert "LLM_PRICES" in str(e.value) and "\n" not in str(e.value)


def test_parse_prices() -> None:
    assert parse_prices('{"a": [0, 0.5], "b": [2, 3]}') == {"a": (0.0, 0.5), "b": (2.0, 3.0)}
    assert parse_prices("{}") == {}


def test_cost_is_safe_from_many_threads() -> None:
    table = PriceTable()
    totals: list[float] = []

    def work() -> None:
        totals.append(sum(table.cost(f"unknown-{i % 7}", 10, 10) for i in range(500)))
        totals.append(sum(table.cost("gpt-4o", 1000, 1000) for _ in range(500)))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert table.unpriced == {f"unknown-{i}" for i in range(7)}
    assert sorted(totals)[-1] == pytest.approx(500 * 0.0125)

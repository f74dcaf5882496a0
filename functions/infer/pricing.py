"""What LLM calls cost: USD per million input and output tokens, by model.

The table holds list prices of common models at the time of writing; `LLM_PRICES` (JSON:
{"model": [usd_per_1M_input, usd_per_1M_output]}) adds to or overrides it. A model found
neither by name nor by family costs 0 and is flagged: `unpriced` names it and a warning is
logged once, so a budget in USD is visibly not enforced for it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Mapping

from functions.config import ConfigError

log = logging.getLogger("rlm.pricing")

Price = tuple[float, float]  # USD per 1M input tokens, per 1M output tokens

DEFAULT_PRICES: dict[str, Price] = {
    "gpt-5": (1.25, 10.0),
    "gpt-5.1": (1.25, 10.0),
    "gpt-5-mini": (0.25, 2.0),
    "gpt-5-nano": (0.05, 0.4),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.4, 1.6),
    "gpt-4.1-nano": (0.1, 0.4),
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-mini": (0.15, 0.6),
    "gpt-4-turbo": (10.0, 30.0),
    "gpt-3.5-turbo": (0.5, 1.5),
    "o1": (15.0, 60.0),
    "o3": (2.0, 8.0),
    "o3-pro": (20.0, 80.0),
    "o3-mini": (1.1, 4.4),
    "o4-mini": (1.1, 4.4),
    "claude-opus-4": (15.0, 75.0),
    "claude-opus-4-5": (5.0, 25.0),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-haiku-4": (1.0, 5.0),
    "claude-3-7-sonnet": (3.0, 15.0),
    "claude-3-5-sonnet": (3.0, 15.0),
    "claude-3-5-haiku": (0.8, 4.0),
    "gemini-2.5-pro": (1.25, 10.0),
    "gemini-2.5-flash": (0.3, 2.5),
    "gemini-2.5-flash-lite": (0.1, 0.4),
    "gemini-2.0-flash": (0.1, 0.4),
}

# A dated or versioned name belongs to a family in the table: "gpt-4o-2024-08-06", "o3@2025",
# "claude-sonnet-4-20250514". The separator keeps "gpt-4" from pricing "gpt-4o".
_SEPARATORS = ("-", "@", ":", "_")


class PriceTable:
    """Thread-safe; `cost` is called from every sub-call thread."""

    def __init__(self, overrides_json: str = "", overrides: Mapping[str, Price] | None = None):
        self.prices: dict[str, Price] = dict(DEFAULT_PRICES)
        if overrides_json.strip():
            self.prices.update(parse_prices(overrides_json))
        self.prices.update(overrides or {})
        self.unpriced: set[str] = set()
        self._lock = threading.Lock()

    def price(self, model: str) -> Price | None:
        """The (input, output) price of `model` or of its family; None when unknown."""
        if model in self.prices:
            return self.prices[model]
        name = model.rsplit("/", 1)[-1].lower()  # "openai/gpt-4o" is priced as "gpt-4o"
        if name in self.prices:
            return self.prices[name]
        family = self._family(name)
        return self.prices[family] if family else None

    def _family(self, name: str) -> str | None:
        best = None
        for key in self.prices:
            lowered = key.lower()
            if name.startswith(lowered) and name[len(lowered) : len(lowered) + 1] in _SEPARATORS:
                best = key if best is None or len(key) > len(best) else best
        return best

    def cost(self, model: str, input_tokens: int, output_tokens: int) -> float:
        """USD for one call; 0 for an unknown model, which is then flagged."""
        price = self.price(model)
        if price is None:
            self._flag(model)
            return 0.0
        return (max(0, input_tokens) * price[0] + max(0, output_tokens) * price[1]) / 1_000_000

    def _flag(self, model: str) -> None:
        with self._lock:
            if model in self.unpriced:
                return
            self.unpriced.add(model)
        log.warning("no price for model %r: its calls count as $0 (set LLM_PRICES)", model)


def parse_prices(text: str) -> dict[str, Price]:
    """LLM_PRICES: {"model": [usd_per_1M_input, usd_per_1M_output]}; ConfigError if malformed."""
    try:
        raw = json.loads(text)
    except ValueError:
        raise ConfigError(f"LLM_PRICES is not JSON: {_EXPECTED}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"LLM_PRICES must be a JSON object: {_EXPECTED}")
    prices: dict[str, Price] = {}
    for model, pair in raw.items():
        if not (isinstance(pair, list) and len(pair) == 2 and all(map(_is_price, pair))):
            raise ConfigError(f"LLM_PRICES[{model!r}] must be two prices >= 0: {_EXPECTED}")
        prices[model] = (float(pair[0]), float(pair[1]))
    return prices


_EXPECTED = 'expected {"model": [usd_per_1M_input, usd_per_1M_output], ...}'


def _is_price(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )

"""What LLM calls cost: USD per million input and output tokens, by model.

The table holds list prices for common models; `LLM_PRICES` (JSON: {"model": [in, out]})
adds to or overrides it. A model in neither costs 0 and is named by `unpriced`.
"""

from __future__ import annotations

import json

from functions.config import ConfigError

DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-5": (1.25, 10.0),
    "gpt-5-mini": (0.25, 2.0),
    "gpt-5-nano": (0.05, 0.4),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.4, 1.6),
    "gpt-4.1-nano": (0.1, 0.4),
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-mini": (0.15, 0.6),
    "o3": (2.0, 8.0),
    "o4-mini": (1.1, 4.4),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-opus-4": (15.0, 75.0),
    "claude-haiku-4": (1.0, 5.0),
}


class PriceTable:
    def __init__(self, overrides_json: str = "") -> None:
        self.prices = dict(DEFAULT_PRICES)
        if overrides_json.strip():
            self.prices.update(parse_prices(overrides_json))
        self.unpriced: set[str] = set()

    def cost(self, model: str, input_tokens: int, output_tokens: int) -> float:
        price = self.prices.get(model) or self._by_prefix(model)
        if price is None:
            self.unpriced.add(model)
            return 0.0
        return (input_tokens * price[0] + output_tokens * price[1]) / 1_000_000

    def _by_prefix(self, model: str) -> tuple[float, float] | None:
        """Dated or vendor-prefixed names (`openai/gpt-4o-2024-08-06`) use their family's price."""
        name = model.rsplit("/", 1)[-1]
        best = max((k for k in self.prices if name.startswith(k)), key=len, default=None)
        return self.prices[best] if best else None


def parse_prices(text: str) -> dict[str, tuple[float, float]]:
    try:
        raw = json.loads(text)
        prices = {str(m): (float(p[0]), float(p[1])) for m, p in raw.items()}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise ConfigError(
            'LLM_PRICES must be JSON like {"model": [usd_per_1M_input, usd_per_1M_output]}'
        ) from None
    if any(p < 0 for pair in prices.values() for p in pair):
        raise ConfigError("LLM_PRICES must not hold negative prices")
    return prices

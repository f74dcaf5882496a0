"""Generated haystacks with one needle, for tests and benchmarks."""

from __future__ import annotations

import random


def haystack(chars: int, needle: int, seed: int = 7) -> str:
    """About `chars` characters of filler lines with 'the magic number is <needle>' hidden."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "lambda"]
    line_count = max(10, chars // 72)
    lines = [" ".join(rng.choices(words, k=12)) for _ in range(line_count)]
    lines[rng.randrange(line_count // 3, line_count)] = f"note: the magic number is {needle}"
    return "\n".join(lines)

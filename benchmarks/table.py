"""The one table the benchmark scripts print."""

from __future__ import annotations

from collections.abc import Sequence

HEADERS = ("measure", "median", "min-max", "note")
_MIN_WIDTHS = (0, 12, 15)  # the middle columns line up across a script's tables


def print_table(rows: Sequence[Sequence[str]], headers: Sequence[str] = HEADERS) -> None:
    """Rows of (measure, median, min-max, note) or other `headers`, aligned: the first column
    to the left, the middle ones to the right, the last (a note) to the left."""
    table = [tuple(headers), *(tuple(r) for r in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    for i in range(1, len(headers) - 1):
        widths[i] = max(widths[i], _MIN_WIDTHS[min(i, len(_MIN_WIDTHS) - 1)])
    for row in table:
        cells = [f"{row[0]:<{widths[0]}}"]
        cells += [f"{cell:>{widths[i]}}" for i, cell in enumerate(row[1:-1], 1)]
        print("  ".join([*cells, row[-1]]))

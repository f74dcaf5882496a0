"""The one table the benchmark scripts print."""

from __future__ import annotations

HEADERS = ("measure", "median", "min-max", "note")


def print_table(
    rows: list[tuple[str, str, str, str]], headers: tuple[str, str, str, str] = HEADERS
) -> None:
    """Rows of (measure, median, min-max, note) or other `headers`, aligned."""
    width = max(len(r[0]) for r in [*rows, headers])
    first, second, third, fourth = headers
    print(f"{first:<{width}}  {second:>12}  {third:>15}  {fourth}")
    for name, med, spread, note in rows:
        print(f"{name:<{width}}  {med:>12}  {spread:>15}  {note}")

"""The one table both benchmark scripts print."""

from __future__ import annotations


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    """Rows of (measure, median, min-max, note), aligned."""
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'median':>12}  {'min-max':>15}  note")
    for name, med, spread, note in rows:
        print(f"{name:<{width}}  {med:>12}  {spread:>15}  {note}")

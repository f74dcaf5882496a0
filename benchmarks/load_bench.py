"""Load benchmark: N concurrent RLM runs through infer's HTTP API, each on its own context.

    python benchmarks/load_bench.py [--runs 1 8 32 64] [--max-runs 16] [--slots 2]

Infer, execute and the scripted model run as real processes on loopback. Infer takes at most
`--max-runs` runs at once (more get 429 + Retry-After, which the client honours); execute has
`--slots` cell slots and answers 503 + Retry-After after `--queue-wait` s (infer honours it).
Per N it prints completed runs, wrong answers, answers leaked from another run's context,
p50/p95 latency, 429s and 503s, timeouts and 5xx (both must be 0) and the execute process
tree's peak RSS. Then the cost of a cell on a fresh execute process (no warm cache) vs warm.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.table import print_table
from functions.testing.load import (
    Stack,
    cell_seconds,
    drive,
    load_policy,
    restarting,
    run_context,
    start_stack,
)

LOAD_HEADERS = ("concurrent runs", "p50 / p95", "429 / 503", "completed, wrong, leaked, ...")


def load_rows(stack: Stack, sizes: list[int], chars: int, timeout_s: float) -> list[tuple]:
    rows = []
    for n in sizes:
        r = drive(stack, n, chars, timeout_s)
        rows.append((
            f"N={n}", f"{r.latency(50):.1f} / {r.latency(95):.1f} s",
            f"{r.refused} / {r.execute_503}",
            f"{r.completed}/{n} done, {r.wrong} wrong, {r.leaked} leaked, {r.timeouts} timeouts, "
            f"{r.http_5xx} 5xx, execute peak RSS {r.rss_peak_mb:,.0f} MB, {r.wall_s:.1f} s wall",
        ))  # fmt: skip
        for problem in r.problems()[:5]:
            print(f"N={n}: {problem}", file=sys.stderr)
    return rows


def cells(stack: Stack, runs: int, chars: int) -> list[float]:
    """Cell wall times of `runs` runs one after another (two cells each)."""
    seconds = []
    for i in range(runs):
        body = {"query": "magic?", "context": run_context(i, chars), "trajectory": True}
        result = httpx.post(stack.infer.url + "/infer", json=body, timeout=300).json()
        assert result["status"] == "completed", result
        seconds += cell_seconds(result)
    return seconds


def fresh_rows(stack: Stack, switch: dict, runs: int, chars: int) -> list[tuple]:
    switch["policy"] = load_policy
    warm = cells(stack, runs, chars)
    switch["policy"], starts = restarting(stack, load_policy)
    fresh = cells(stack, runs, chars)
    switch["policy"] = load_policy
    w, f = statistics.median(warm), statistics.median(fresh)
    return [
        ("cell, warm execute process", f"{w * 1000:,.0f} ms",
         f"{min(warm) * 1000:,.0f}-{max(warm) * 1000:,.0f}", f"{len(warm)} cells"),
        ("cell, fresh execute process per cell", f"{f * 1000:,.0f} ms",
         f"{min(fresh) * 1000:,.0f}-{max(fresh) * 1000:,.0f}",
         f"added per cell: {(f - w) * 1000:,.0f} ms (409, re-send, restore)"),
        ("execute restart: SIGKILL to ready", f"{statistics.median(starts):.1f} s",
         f"{min(starts):.1f}-{max(starts):.1f}", "paid once per fresh process"),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--max-runs", type=int, default=16, help="INFER_MAX_RUNS")
    parser.add_argument("--slots", type=int, default=2, help="EXECUTE_CONCURRENCY")
    parser.add_argument("--queue-wait", type=float, default=0.1, help="EXECUTE_QUEUE_WAIT")
    parser.add_argument("--chars", type=int, default=20_000, help="context size per run")
    parser.add_argument("--timeout", type=float, default=120, help="bound per load, seconds")
    parser.add_argument("--fresh-runs", type=int, default=3, help="0: skip the fresh mode")
    args = parser.parse_args()
    started = time.monotonic()
    switch = {"policy": load_policy}
    stack = start_stack(lambda request: switch["policy"](request), Path(tempfile.mkdtemp()),
                        args.max_runs, args.slots, args.queue_wait)  # fmt: skip
    try:
        rows = load_rows(stack, args.runs, args.chars, args.timeout)
        fresh = fresh_rows(stack, switch, args.fresh_runs, args.chars) if args.fresh_runs else []
    finally:
        stack.stop()
        for old in stack.replaced:
            old.stop()
    print(f"INFER_MAX_RUNS={args.max_runs}, EXECUTE_CONCURRENCY={args.slots}, "
          f"EXECUTE_QUEUE_WAIT={args.queue_wait} s, {args.chars:,} chars per run")  # fmt: skip
    print_table(rows, LOAD_HEADERS)
    if fresh:
        print()
        print_table(fresh)
    print(f"\n{time.monotonic() - started:.0f} s in all")


if __name__ == "__main__":
    main()

"""Infer-plane benchmark: both functions as real processes, the scripted model as the LLM.

    python benchmarks/infer_bench.py [--quick]

Prints one table: the run ledger's own cost per sub-call and per root turn (in this process
and in a Redis on loopback), then with infer on each ledger: the loop's own cost per turn
(model time excluded), a batch of 100 sub-calls against a model that takes 200 ms per reply,
the time from a cancel to the run's result while its cell waits on a slow sub-call; and a
needle search at 1, 10, 50 MB.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.table import print_table
from functions.contract import ModelUsage
from functions.infer.ledger import Ledger, MemoryStore, RedisStore, RunKey
from functions.testing.haystack import haystack
from functions.testing.processes import free_port, serve
from functions.testing.redis_server import PASSWORD, RedisServer
from functions.testing.scripted_model import ScriptedModel, needle_policy, repl, scripted_replies

TURNS = 20
CANCEL = {"x-rlm-cancel-token": "benchmark-cancel-token"}


def stats(samples: list[float], scale: float = 1000, digits: int = 1) -> tuple[str, str]:
    med, low, high = (x * scale for x in (statistics.median(samples), min(samples), max(samples)))
    return f"{med:,.{digits}f}", f"{low:,.{digits}f}-{high:,.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no 50 MB run")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp())
    switch = {"policy": needle_policy}
    model = ScriptedModel(lambda request: switch["policy"](request)).start()
    execute = serve("execute", {}, logs, ready="/health/readiness")
    port = free_port()
    env = {
        "LLM_BASE_URL": model.base_url, "LLM_API_KEY": "k", "LLM_MODEL": "scripted",
        "WASM_SERVICE_URL": execute.url, "INFER_CALLBACK_URL": f"http://127.0.0.1:{port}",
        "RLM_TOKEN_KEY": "benchmark-key-0123456789abcdef0123456789", "MAX_ITERATIONS": "50",
        "INFER_MAX_CONTEXT_MB": "128", "INFER_AUTH": "none",
    }  # fmt: skip
    redis = RedisServer(logs).start()
    rows = ledger_rows(redis, 200 if args.quick else 2000)
    client = httpx.Client(timeout=600)
    for ledger in ("in-process", "redis"):
        if ledger == "redis":
            env |= {"INFER_STORE_URL": redis.url, "INFER_STORE_PASSWORD": PASSWORD}
        infer = serve("infer", env, logs, port=port)
        try:
            rows += served_rows(client, infer.url, model, switch, args.quick, ledger)
        finally:
            infer.stop()
    infer = serve("infer", env, logs, port=port)
    try:
        rows += needle_rows(client, infer.url, switch, args.quick)
    finally:
        infer.stop()
        execute.stop()
        model.stop()
        redis.stop()
    print_table(rows)


def ledger_rows(redis: RedisServer, repeats: int) -> list[tuple[str, str, str, str]]:
    """What the ledger adds to one sub-call and to one root turn, by the operations each does."""
    rows = []
    usage = ModelUsage(calls=1, input_tokens=100, output_tokens=20, cost_usd=0.0001)
    for name, store in (("in-process", MemoryStore()), ("redis", RedisStore(redis.url, PASSWORD))):
        ledger = Ledger(store)
        key = RunKey("bench", f"run-{name}")
        ledger.open_run(key, 1e9, None, 3600)
        ledger.open_cell(key, key.run_id, "cell", False, 3600)
        caps = ledger.budgets(key)  # read once per run tree, as the account does

        def subcall(i: int, ledger: Ledger = ledger, key: RunKey = key, caps: dict = caps) -> None:
            keep_s = ledger.take_prompts(key, key.run_id, "cell", 1, 10**9)
            ledger.cancelled(key)
            held = ledger.reserve(key, 100, 4096, (1.0, 2.0), caps)
            ledger.settle(key, held, "m", usage)
            ledger.remember(key, f"call {i}", ["answer"], keep_s)
            ledger.log(key, "cell", {"kind": "llm", "calls": []}, keep_s)

        def turn(i: int, ledger: Ledger = ledger, key: RunKey = key, caps: dict = caps) -> None:
            ledger.cancelled(key)
            ledger.stopped(key)
            ledger.spent(key)
            held = ledger.reserve(key, 2000, 4096, (1.0, 2.0), caps)
            ledger.settle(key, held, "m", usage)
            ledger.checkpoint(key, {"messages": [{"role": "user", "content": "x" * 4000}]})
            ledger.open_cell(key, key.run_id, f"cell-{i}", False, 3600)
            ledger.take_log(key, f"cell-{i}")
            ledger.checkpoint(key, {"messages": [{"role": "user", "content": "x" * 8000}]})

        for label, work, target in (("sub-call", subcall, "target <= 1 ms with Redis"),
                                    ("root turn", turn, "")):  # fmt: skip
            samples = []
            for i in range(repeats):
                started = time.perf_counter()
                work(i)
                samples.append(time.perf_counter() - started)
            med, spread = stats(samples, digits=3)
            rows.append((f"ledger cost per {label}, {name}", f"{med} ms", spread, target))
    return rows


def served_rows(
    client: httpx.Client, url: str, model: ScriptedModel, switch: dict, quick: bool, ledger: str
) -> list[tuple[str, str, str, str]]:
    rows = []
    # 1. The loop's own cost per turn: infer -> execute -> infer, model time excluded.
    steps = [repl(f"x = {i}") for i in range(TURNS - 1)]
    switch["policy"] = scripted_replies([*steps, repl("answer.update(content='ok', ready=True)")])
    per_turn = []
    for _ in range(3 if quick else 10):
        result = client.post(url + "/infer", json={"query": "q", "context": "c",
                             "trajectory": True}).json()  # fmt: skip
        model_s = sum(e["seconds"] for e in result["trajectory"] if e["kind"] == "llm")
        per_turn.append((result["execution_time"] - model_s) / result["iterations"])
    med, spread = stats(per_turn)
    rows.append((f"loop overhead per turn (model excluded), ledger {ledger}", f"{med} ms",
                 spread, f"{TURNS} turns a run; target p50 <= 15 ms"))  # fmt: skip

    # 2. 100 sub-calls in one llm_query_batched, 200 ms per model reply.
    batch = repl("r = llm_query_batched([f'q{i}' for i in range(100)])\n"
                 "answer.update(content=str(len(r)), ready=True)")  # fmt: skip
    switch["policy"] = scripted_replies([batch])
    model.latency_s = 0.2
    cells = []
    for _ in range(3 if quick else 5):
        result = client.post(url + "/infer", json={"query": "q", "context": "c",
                             "trajectory": True}).json()  # fmt: skip
        assert result["answer"] == "100", result
        cells += [e["seconds"] for e in result["trajectory"] if e["kind"] == "cell"]
    med, spread = stats(cells, 1)
    rows.append((f"100 sub-calls, 200 ms model latency, ledger {ledger}", f"{med} s",
                 spread, "default concurrency 32; target <= 1.5 s"))  # fmt: skip
    model.latency_s = 0.0

    # 3. Cancel: the cell waits on a sub-call the model takes 10 s to answer.
    med, spread = stats(cancel_latencies(client, url, model, switch, 3 if quick else 5))
    rows.append((f"cancel -> result, cell waiting on a sub-call, ledger {ledger}",
                 f"{med} ms", spread, "POST /infer/{id}/cancel; target <= 1 s"))  # fmt: skip
    return rows


def needle_rows(
    client: httpx.Client, url: str, switch: dict, quick: bool
) -> list[tuple[str, str, str, str]]:
    rows = []
    switch["policy"] = needle_policy
    for size_mb in (1, 10) if quick else (1, 10, 50):
        text = haystack(size_mb << 20, 90210)
        walls = []
        for _ in range(1 if size_mb == 50 else 3):
            result = client.post(url + "/infer", json={"query": "magic number?",
                                 "context": text}).json()  # fmt: skip
            assert result["answer"] == "90210", result
            walls.append(result["execution_time"])
        med, spread = stats(walls, 1)
        rows.append((f"needle run, {size_mb} MB context", f"{med} s", spread,
                     f"{result['usage']['scripted']['calls']} model calls"))  # fmt: skip
    return rows


def cancel_latencies(
    client: httpx.Client, url: str, model: ScriptedModel, switch: dict, repeats: int
) -> list[float]:
    """Seconds from POST /infer/{id}/cancel to the /infer response, `repeats` times."""
    samples = []
    for i in range(repeats):
        release, done = threading.Event(), threading.Event()

        def slow(_request: object, gate: threading.Event = release) -> str:
            gate.wait(10)
            return "late"

        switch["policy"] = scripted_replies([repl("r = llm_query('slow')")], slow)
        model.reset()
        run_id = f"bench-cancel-{i}"

        def post(run_id: str = run_id, done: threading.Event = done) -> None:
            client.post(url + "/infer", json={"query": "q", "context": "c", "run_id": run_id},
                        headers=CANCEL)  # fmt: skip
            done.set()

        threading.Thread(target=post).start()
        while model.received < 2:  # the root turn, then the cell's sub-call
            time.sleep(0.01)
        time.sleep(0.2)
        asked = time.monotonic()
        client.post(f"{url}/infer/{run_id}/cancel", headers=CANCEL)
        done.wait()
        samples.append(time.monotonic() - asked)
        release.set()
    return samples


if __name__ == "__main__":
    main()

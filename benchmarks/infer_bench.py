"""Infer-plane benchmark: both functions as real processes, the scripted model as the LLM.

    python benchmarks/infer_bench.py [--quick]

Prints one table: the loop's own cost per turn (model time excluded), a batch of 100
sub-calls against a model that takes 200 ms per reply, the time from a cancel to the run's
result while its cell waits on a slow sub-call, and a needle search at 1, 10, 50 MB.
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
from functions.testing.haystack import haystack
from functions.testing.processes import free_port, serve
from functions.testing.scripted_model import ScriptedModel, needle_policy, repl, scripted_replies

TURNS = 20


def stats(samples: list[float], scale: float = 1000) -> tuple[str, str]:
    med = statistics.median(samples) * scale
    return f"{med:,.1f}", f"{min(samples) * scale:,.1f}-{max(samples) * scale:,.1f}"


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
    infer = serve("infer", env, logs, port=port)
    client = httpx.Client(timeout=600)
    rows = []
    try:
        # 1. The loop's own cost per turn: infer -> execute -> infer, model time excluded.
        steps = [repl(f"x = {i}") for i in range(TURNS - 1)]
        switch["policy"] = scripted_replies(
            [*steps, repl("answer.update(content='ok', ready=True)")]
        )
        per_turn = []
        for _ in range(3 if args.quick else 10):
            result = client.post(infer.url + "/infer", json={"query": "q", "context": "c",
                                 "trajectory": True}).json()  # fmt: skip
            model_s = sum(e["seconds"] for e in result["trajectory"] if e["kind"] == "llm")
            per_turn.append((result["execution_time"] - model_s) / result["iterations"])
        med, spread = stats(per_turn)
        rows.append(("loop overhead per turn (model excluded)", f"{med} ms", spread,
                     f"{TURNS} turns a run; target p50 <= 15 ms"))  # fmt: skip

        # 2. 100 sub-calls in one llm_query_batched, 200 ms per model reply.
        batch = repl("r = llm_query_batched([f'q{i}' for i in range(100)])\n"
                     "answer.update(content=str(len(r)), ready=True)")  # fmt: skip
        switch["policy"] = scripted_replies([batch])
        model.latency_s = 0.2
        cells = []
        for _ in range(3 if args.quick else 5):
            result = client.post(infer.url + "/infer", json={"query": "q", "context": "c",
                                 "trajectory": True}).json()  # fmt: skip
            assert result["answer"] == "100", result
            cells += [e["seconds"] for e in result["trajectory"] if e["kind"] == "cell"]
        med, spread = stats(cells, 1)
        rows.append(("100 sub-calls, 200 ms model latency", f"{med} s", spread,
                     "default concurrency 32; target <= 1.5 s"))  # fmt: skip
        model.latency_s = 0.0

        # 3. Cancel: the cell waits on a sub-call the model takes 10 s to answer.
        med, spread = stats(cancel_latencies(client, infer.url, model, switch, 3 if args.quick
                                             else 5))  # fmt: skip
        rows.append(("cancel -> result, cell waiting on a sub-call", f"{med} ms", spread,
                     "POST /infer/{id}/cancel; target <= 1 s"))  # fmt: skip

        # 4. The needle run at 1, 10 and 50 MB of context.
        switch["policy"] = needle_policy
        for size_mb in (1, 10) if args.quick else (1, 10, 50):
            text = haystack(size_mb << 20, 90210)
            walls = []
            for _ in range(1 if size_mb == 50 else 3):
                result = client.post(infer.url + "/infer", json={"query": "magic number?",
                                     "context": text}).json()  # fmt: skip
                assert result["answer"] == "90210", result
                walls.append(result["execution_time"])
            med, spread = stats(walls, 1)
            rows.append((f"needle run, {size_mb} MB context", f"{med} s", spread,
                         f"{result['usage']['scripted']['calls']} model calls"))  # fmt: skip
    finally:
        infer.stop()
        execute.stop()
        model.stop()
    print_table(rows)


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
            client.post(url + "/infer", json={"query": "q", "context": "c", "run_id": run_id})
            done.set()

        threading.Thread(target=post).start()
        while model.received < 2:  # the root turn, then the cell's sub-call
            time.sleep(0.01)
        time.sleep(0.2)
        asked = time.monotonic()
        client.post(f"{url}/infer/{run_id}/cancel")
        done.wait()
        samples.append(time.monotonic() - asked)
        release.set()
    return samples


if __name__ == "__main__":
    main()

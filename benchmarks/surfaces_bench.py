"""Agent surfaces benchmark: infer and execute as real processes, the scripted model as the LLM.

    python benchmarks/surfaces_bench.py [--quick]

Prints one table: the same needle run (1 MB) through /infer, the OpenAI facade and /mcp (the
MCP SDK's client), so the surfaces' own cost shows; the chat stream's first chunk on a run of
about ten seconds; and the time from a client's cancel (a closed chat stream, an MCP call
cancelled) to the run's end while its cell waits on a slow sub-call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import anyio
import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.table import print_table
from functions.testing.haystack import haystack
from functions.testing.load import serve_planes
from functions.testing.scripted_model import ScriptedModel, needle_policy, repl, scripted_replies

QUESTION = "What is the magic number?"


def stats(samples: list[float], scale: float = 1000, digits: int = 0) -> tuple[str, str]:
    med, low, high = (x * scale for x in (statistics.median(samples), min(samples), max(samples)))
    return f"{med:,.{digits}f}", f"{low:,.{digits}f}-{high:,.{digits}f}"


def stopped_runs(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    prefix = 'rlm_inference_requests_total{status="stopped"}'
    return next((float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(prefix)), 0.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else 10
    logs = Path(tempfile.mkdtemp())
    switch = {"policy": needle_policy}
    model = ScriptedModel(lambda request: switch["policy"](request)).start()
    execute, infer, _ = serve_planes(model.base_url, logs, {"THREADS": "16"})
    rows: list[tuple[str, str, str, str]] = []
    try:
        context = haystack(1_000_000, 31337)
        rows += same_run(infer.url, context, repeats)
        switch["policy"] = scripted_replies([repl("print(len(context))"), "FINAL(done)"])
        model.latency_s = 5.0
        rows.append(first_chunk(infer.url, max(2, repeats // 3)))
        model.latency_s = 0.0
        release = threading.Event()

        def slow(request):
            release.wait(8)
            return "late"

        switch["policy"] = scripted_replies([repl("r = llm_query('slow')\nprint(r)")], slow)
        rows += cancels(infer.url, model, release, max(2, repeats // 3))
    finally:
        infer.stop()
        execute.stop()
        model.stop()
    print_table(rows)


def same_run(url: str, context: str, repeats: int) -> list[tuple[str, str, str, str]]:
    chat = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    timings: dict[str, list[float]] = {"infer": [], "chat": [], "mcp": []}

    async def mcp_calls() -> None:
        from mcp import Client

        async with Client(url + "/mcp") as client:
            for _ in range(repeats):
                started = time.perf_counter()
                result = await client.call_tool("ask", {"question": QUESTION, "context": context})
                assert result.structured_content["answer"] == "31337", result
                timings["mcp"].append(time.perf_counter() - started)

    for _ in range(repeats):
        started = time.perf_counter()
        body = httpx.post(url + "/infer", json={"query": QUESTION, "context": context},
                          timeout=120).json()  # fmt: skip
        assert body["answer"] == "31337", body
        timings["infer"].append(time.perf_counter() - started)
        started = time.perf_counter()
        done = chat.chat.completions.create(
            model="rlm", messages=[{"role": "user", "content": context},
                                   {"role": "user", "content": QUESTION}],
        )  # fmt: skip
        assert done.choices[0].message.content == "31337"
        timings["chat"].append(time.perf_counter() - started)
    anyio.run(mcp_calls)
    note = "1 MB needle: 2 root turns, 10 sub-calls"
    return [
        ("the run via POST /infer (ms)", *stats(timings["infer"]), note),
        ("the run via /v1/chat/completions (ms)", *stats(timings["chat"]), "context as a message"),
        ("the run via /mcp tools/call (ms)", *stats(timings["mcp"]), "MCP SDK client, 2026-07-28"),
    ]


def first_chunk(url: str, repeats: int) -> tuple[str, str, str, str]:
    chat = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    firsts, totals = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        stream = chat.chat.completions.create(
            model="rlm", stream=True, messages=[{"role": "user", "content": QUESTION}]
        )
        arrivals = [time.perf_counter() - started for _ in stream]
        firsts.append(arrivals[0])
        totals.append(arrivals[-1])
    total = statistics.median(totals)
    return ("chat stream: first chunk (ms)", *stats(firsts), f"of a {total:.1f} s run")


def cancels(url: str, model: ScriptedModel, release: threading.Event, repeats: int) -> list:
    chat = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)

    def wait_for_subcall() -> None:
        while model.received < 2:
            time.sleep(0.01)

    def ended_after(cancelled_at: float, before: float) -> float:
        while stopped_runs(url) == before:
            time.sleep(0.02)
        return time.perf_counter() - cancelled_at

    chat_s, mcp_s = [], []
    for _ in range(repeats):
        model.reset()
        release.clear()
        before = stopped_runs(url)
        stream = chat.chat.completions.create(
            model="rlm", stream=True, messages=[{"role": "user", "content": QUESTION}]
        )
        next(iter(stream))
        wait_for_subcall()
        cancelled_at = time.perf_counter()
        stream.close()
        chat_s.append(ended_after(cancelled_at, before))
        release.set()

    async def mcp_cancel() -> None:
        from mcp import Client

        async with Client(url + "/mcp") as client:
            for _ in range(repeats):
                model.reset()
                release.clear()
                before = stopped_runs(url)
                with anyio.CancelScope() as scope:
                    async with anyio.create_task_group() as tasks:
                        tasks.start_soon(client.call_tool, "ask", {"question": "q"})
                        await anyio.to_thread.run_sync(wait_for_subcall)
                        cancelled_at = time.perf_counter()
                        scope.cancel()
                mcp_s.append(await anyio.to_thread.run_sync(ended_after, cancelled_at, before))
                release.set()

    anyio.run(mcp_cancel)
    note = "cell waiting on a sub-call of 8 s"
    return [
        ("chat stream closed -> run ended (ms)", *stats(chat_s), note),
        ("MCP call cancelled -> run ended (ms)", *stats(mcp_s), note),
    ]


if __name__ == "__main__":
    main()

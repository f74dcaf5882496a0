"""Side by side with the official `rlms` library: one needle task, each run a fresh process.

It installs nothing. The official library (PyPI `rlms`, imported as `rlm`) goes in a benchmark
venv of its own, next to this project:

    python3 -m venv /work/bench-venv && /work/bench-venv/bin/pip install rlms -e '.[all]'
    /work/bench-venv/bin/python benchmarks/vs_rlms.py [--quick]

Without `rlms` importable it runs this project's rows only, without ratios.

The task: a generated haystack of 1, 10 and 50 MB with one 'magic number' line. A scripted
OpenAI-compatible model on loopback plays the same policy for every system: probe the context;
split it into 100,000-character chunks and ask one `llm_query_batched` over all of them; set
the answer from what came back (3 root calls; 10, 100, 500 sub-calls). Latency 0 and 200 ms
per model reply. The systems:

- official: `rlm.RLM(environment="local")`, the official library's unsandboxed `exec`;
- embedded: `functions.RLM`, this project in one process (the WebAssembly sandbox in it);
- served: infer and execute as real processes on loopback, a fresh pair for each run, timed
  from the request to its answer; CPU and peak RSS are the two servers'.

Wall and CPU cover constructing the RLM and the run (imports excluded); peak RSS is each
process's high-water mark (VmHWM), summed over the process tree, the context included.
Medians with min-max over the repeats; the systems take turns in each repeat so that noise
from other work on the machine falls on all of them alike. The machine's load average is
printed with the table: on a busy machine, read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.table import print_table
from functions.testing.haystack import haystack
from functions.testing.processes import process_tree
from functions.testing.scripted_model import ModelRequest, ScriptedModel, answer_from_prompt, repl

NEEDLE = 90210
QUERY = "What is the magic number in the context?"
CHUNK_CHARS = 100_000
RESULT_MARK = "vs-rlms-result:"

PROBE = repl("print(type(context), len(context))", "First, a look at the context.")
SEARCH = repl(
    f"""
size = {CHUNK_CHARS}
chunks = [context[i : i + size] for i in range(0, len(context), size)]
prompts = [
    f"Find the magic number in this text. Reply with just the number or NONE.\\n{{chunk}}"
    for chunk in chunks
]
replies = llm_query_batched(prompts)
found = [r.strip() for r in replies if r.strip() and r.strip().upper() != "NONE"]
print(f"{{len(chunks)}} chunks searched; found: {{found}}")
""",
    "I will ask the sub-model about every chunk at once.",
)
PICK = repl(
    'answer["content"] = found[0] if found else "NONE"\nanswer["ready"] = True',
    "The search found it.",
)


def policy(request: ModelRequest) -> str:
    """The one policy every system gets: probe, search all chunks in one batch, pick."""
    if not request.is_root:
        return answer_from_prompt(request)
    return (PROBE, SEARCH, PICK)[min(request.turn, 2)]


@dataclass
class Sample:
    wall_s: float
    cpu_s: float
    rss_mb: float
    answer: str | None


@dataclass
class Cell:
    samples: list[Sample] = field(default_factory=list)

    def stat(self, name: str, digits: int) -> tuple[float, str]:
        values = [getattr(s, name) for s in self.samples]
        med = statistics.median(values)
        spread = f"{min(values):,.{digits}f}-{max(values):,.{digits}f}"
        return med, f"{med:,.{digits}f} ({spread})"


# ----------------------------------------------------------------------------- one run


def run_one(system: str, context_file: str, base_url: str) -> None:
    """In a fresh process: one RLM run of `system`; prints the measures as the last line."""
    model = {"model_name": "scripted", "base_url": base_url, "api_key": "benchmark"}
    context = Path(context_file).read_text()
    if system == "official":
        from rlm import RLM
    else:
        from functions import RLM
    started, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    if system == "official":
        rlm = RLM(backend="openai", backend_kwargs=model, environment="local", max_iterations=10)
    else:
        rlm = RLM(backend_kwargs=model, max_iterations=10)
    answer = rlm.completion(context, root_prompt=QUERY).response
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    sample = {"wall_s": wall, "cpu_s": cpu, "rss_mb": after.ru_maxrss / 1024, "answer": answer}
    print(RESULT_MARK + json.dumps(sample), flush=True)
    os._exit(0)  # the measures are out; interpreter teardown is not part of the run


def in_process(system: str, context_file: Path, model: ScriptedModel, logs: Path) -> Sample:
    command = [sys.executable, __file__, "--one", system, str(context_file), model.base_url]
    log = logs / f"{system}.log"
    with log.open("ab") as err:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, timeout=1800)
    lines = [ln for ln in done.stdout.decode().splitlines() if ln.startswith(RESULT_MARK)]
    if not lines:
        raise RuntimeError(f"{system} run failed (exit {done.returncode}); see {log}")
    return Sample(**json.loads(lines[-1].removeprefix(RESULT_MARK)))


def served(context: str, model: ScriptedModel, logs: Path) -> Sample:
    import httpx

    from functions.testing.load import serve_planes

    settings = {"MAX_ITERATIONS": "10", "INFER_MAX_CONTEXT_MB": "128"}
    execute, infer, _ = serve_planes(model.base_url, logs, settings)
    try:
        trees = [process_tree(execute.process.pid), process_tree(infer.process.pid)]
        body = json.dumps({"query": QUERY, "context": context}).encode()
        cpu_before = sum(tree_cpu_s(t) for t in trees)
        started = time.perf_counter()
        response = httpx.post(infer.url + "/infer", content=body, timeout=1800,
                              headers={"content-type": "application/json"})  # fmt: skip
        wall = time.perf_counter() - started
        cpu = sum(tree_cpu_s(t) for t in trees) - cpu_before
        rss = sum(tree_peak_mb(t) for t in trees)
        answer = response.json().get("answer") if response.status_code == 200 else None
    finally:
        infer.stop()
        execute.stop()
    return Sample(wall, cpu, rss, answer)


def tree_cpu_s(pids: list[int]) -> float:
    """User and system CPU seconds of these processes (Linux /proc)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def tree_peak_mb(pids: list[int]) -> float:
    """The sum of these processes' peak resident sets (VmHWM), in MB."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total / 1024


# ----------------------------------------------------------------------------- the table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 and 10 MB, one repeat")
    parser.add_argument("--sizes", type=int, nargs="+", help="context sizes in MB (1 10 50)")
    parser.add_argument("--latencies", type=int, nargs="+", help="model ms per reply (0 200)")
    parser.add_argument("--repeats", type=int, help="runs per system and setting (3)")
    parser.add_argument("--systems", nargs="+", choices=("official", "embedded", "served"))
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # system, context file, model
    args = parser.parse_args()
    if args.one:
        run_one(*args.one)
        return
    sizes = args.sizes or ([1, 10] if args.quick else [1, 10, 50])
    latencies = args.latencies or [0, 200]
    repeats = args.repeats or (1 if args.quick else 3)
    systems = args.systems or ["official", "embedded", "served"]
    if importlib.util.find_spec("rlm") is None or importlib.util.find_spec("rlm.core") is None:
        print("the official library is not importable: this project's rows only. Setup:\n"
              "  python3 -m venv /work/bench-venv && "
              "/work/bench-venv/bin/pip install rlms -e '.[all]'\n")  # fmt: skip
        systems = [s for s in systems if s != "official"]
    logs = Path(tempfile.mkdtemp(prefix="vs-rlms-"))
    results: dict[tuple[int, int, str], Cell] = {}
    loads = [os.getloadavg()[0]]
    with ScriptedModel(policy) as model:
        for size_mb in sizes:
            context = haystack(size_mb << 20, NEEDLE)
            context_file = logs / f"context-{size_mb}.txt"
            context_file.write_text(context)
            for latency_ms in latencies:
                for _ in range(repeats):
                    for system in systems:
                        model.reset()
                        model.latency_s = latency_ms / 1000
                        if system == "served":
                            sample = served(context, model, logs)
                        else:
                            sample = in_process(system, context_file, model, logs)
                        if sample.answer != str(NEEDLE):
                            raise RuntimeError(f"{system} answered {sample.answer!r}; see {logs}")
                        key = (size_mb, latency_ms, system)
                        results.setdefault(key, Cell()).samples.append(sample)
                        loads.append(os.getloadavg()[0])
            context_file.unlink()
    print_results(results, sizes, latencies, systems, repeats)
    print(f"\nload average (1 min) during the runs: {min(loads):.1f}-{max(loads):.1f} "
          f"on {os.cpu_count()} CPUs; logs in {logs}")  # fmt: skip


def print_results(
    results: dict[tuple[int, int, str], Cell],
    sizes: list[int],
    latencies: list[int],
    systems: list[str],
    repeats: int,
) -> None:
    rows = []
    for size_mb in sizes:
        for latency_ms in latencies:
            base = results.get((size_mb, latency_ms, "official"))
            for system in systems:
                cell = results[(size_mb, latency_ms, system)]
                wall, wall_text = cell.stat("wall_s", 2)
                cpu, cpu_text = cell.stat("cpu_s", 2)
                rss, rss_text = cell.stat("rss_mb", 0)
                ratios = ""
                if base is not None and system != "official":
                    ratios = (f"{wall / base.stat('wall_s', 2)[0]:.2f}x / "
                              f"{cpu / base.stat('cpu_s', 2)[0]:.2f}x / "
                              f"{rss / base.stat('rss_mb', 0)[0]:.2f}x")  # fmt: skip
                name = f"{size_mb} MB, {latency_ms} ms, {system}"
                rows.append((name, wall_text, cpu_text, rss_text, ratios))
    headers = (f"context, latency, system ({repeats} runs)", "wall s", "CPU s", "peak RSS MB",
               "vs official: wall / CPU / RSS")  # fmt: skip
    print_table(rows, headers)


if __name__ == "__main__":
    main()

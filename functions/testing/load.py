"""Concurrent RLM runs through infer's HTTP API, each on its own context: the load driver.

`benchmarks/load_bench.py` and `tests/test_reliability.py` both use it. Infer and execute run
as real processes on loopback with the scripted model as the LLM. Run i searches a haystack
that hides its own secret number, in two cells (the second reads what the first stored), so a
wrong answer shows a lost or mixed-up session and an answer that is another run's secret shows
a leak between sessions. The client honours Retry-After on 429/503; timeouts and 5xx answers
are counted, since saturation must show only as 429/503.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from functions.testing.haystack import haystack
from functions.testing.processes import Served, free_port, process_tree, serve
from functions.testing.scripted_model import (
    ModelRequest,
    Policy,
    ScriptedModel,
    answer_from_prompt,
    repl,
)

TOKEN_KEY = "load-test-signing-key-0123456789abcdef0123"

# Cell 1 searches `context` with the sub-model and keeps what it found; cell 2 answers from it.
SEARCH = repl("""
chunks = [context[i : i + 100_000] for i in range(0, len(context), 100_000)]
replies = llm_query_batched([f"Find the magic number.\\n{c}" for c in chunks])
found = [r.strip() for r in replies if r.strip() != "NONE"]
print(found)
""")
ANSWER = repl("answer['content'] = found[0] if found else 'NONE'\nanswer['ready'] = True")


def secret(index: int) -> str:
    """Run `index`'s secret: distinct for every index."""
    return str(100_003 + index * 7_919)


def run_context(index: int, chars: int) -> str:
    return haystack(chars, int(secret(index)), seed=index)


def load_policy(request: ModelRequest) -> str:
    """The root model's two turns (search, then answer); sub-calls read the needle."""
    if not request.is_root:
        return answer_from_prompt(request)
    return SEARCH if request.turn == 0 else ANSWER


# ----------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    """Infer, execute and the scripted model; either function can be killed and restarted."""

    model: ScriptedModel
    infer: Served
    execute: Served
    logs: Path
    envs: dict[str, dict[str, str]]
    replaced: list[Served] = field(default_factory=list)

    def restart(self, plane: str) -> float:
        """SIGKILL `plane` and start a fresh process on the same port; seconds until ready."""
        started = time.monotonic()
        old: Served = getattr(self, plane)
        old.kill()
        self.replaced.append(old)
        port = int(old.url.rsplit(":", 1)[1])
        ready = "/health/readiness" if plane == "execute" else "/health"
        setattr(self, plane, serve(plane, self.envs[plane], self.logs, port=port, ready=ready))
        return time.monotonic() - started

    def stop(self) -> None:
        self.infer.stop()
        self.execute.stop()
        self.model.stop()


def start_stack(
    policy: Policy,
    logs: Path,
    max_runs: int = 32,
    execute_slots: int = 2,
    queue_wait_s: float = 2.0,
    infer_env: dict[str, str] | None = None,
    execute_env: dict[str, str] | None = None,
) -> Stack:
    """Start the scripted model, execute, then infer with room for callbacks beside its runs."""
    model = ScriptedModel(policy).start()
    exec_env = {"EXECUTE_CONCURRENCY": str(execute_slots),
                "EXECUTE_QUEUE_WAIT": str(queue_wait_s), **(execute_env or {})}  # fmt: skip
    env = {
        "LLM_MAX_RETRIES": "6", "MAX_ITERATIONS": "6", "INFER_CELL_TIMEOUT": "60",
        "INFER_MAX_RUNS": str(max_runs),
        # Each run holds a request thread; its cells' sub-call callbacks need threads too.
        "THREADS": str(2 * max_runs + 8), **(infer_env or {}),
    }  # fmt: skip
    execute, infer, envs = serve_planes(model.base_url, logs, env, exec_env)
    return Stack(model, infer, execute, logs, envs)


def serve_planes(
    llm_url: str,
    logs: Path,
    infer_env: dict[str, str] | None = None,
    execute_env: dict[str, str] | None = None,
) -> tuple[Served, Served, dict[str, dict[str, str]]]:
    """Execute, then infer wired to it and to the model at `llm_url`, both on loopback and open
    to any caller (load and benchmarks, not callers: no API keys); each plane's environment."""
    execute = serve("execute", execute_env or {}, logs, ready="/health/readiness")
    port = free_port()
    env = {
        "LLM_BASE_URL": llm_url, "LLM_API_KEY": "k", "LLM_MODEL": "scripted",
        "WASM_SERVICE_URL": execute.url, "INFER_CALLBACK_URL": f"http://127.0.0.1:{port}",
        "RLM_TOKEN_KEY": TOKEN_KEY, "INFER_AUTH": "none", **(infer_env or {}),
    }  # fmt: skip
    try:
        infer = serve("infer", env, logs, port=port)
    except BaseException:
        execute.stop()
        raise
    return execute, infer, {"infer": env, "execute": execute_env or {}}


# ----------------------------------------------------------------------------- one client run


@dataclass
class Outcome:
    index: int
    answer: str | None = None
    status: str = ""  # the run's status, or what stopped the client
    latency_s: float = 0.0
    refused: int = 0  # 429/503 answers honoured (waited Retry-After, asked again)
    without_retry_after: int = 0  # 429/503 answers that did not say when to come back
    timeout: bool = False
    http_5xx: int = 0
    error: str | None = None


def one_run(
    client: httpx.Client, url: str, index: int, chars: int, deadline: float, **body: object
) -> Outcome:
    """POST run `index` to infer until it is answered, honouring Retry-After, until `deadline`."""
    out = Outcome(index)
    payload = {"query": "What is the magic number?", "context": run_context(index, chars), **body}
    started = time.monotonic()
    while time.monotonic() < deadline:
        try:
            r = client.post(url + "/infer", json=payload)
        except httpx.TimeoutException:
            out.timeout, out.status = True, "client timeout"
            break
        except httpx.HTTPError as e:
            out.status = f"connection error: {e}"
            break
        if r.status_code in (429, 503):
            out.refused += 1
            after = r.headers.get("retry-after")
            out.without_retry_after += after is None
            time.sleep(float(after or 1))
            continue
        if r.status_code >= 500:
            out.http_5xx += 1
        try:
            result = r.json()
        except ValueError:
            result = {"status": f"HTTP {r.status_code}"}
        out.answer, out.status = result.get("answer"), result.get("status", f"HTTP {r.status_code}")
        out.error = result.get("error")
        break
    else:
        out.status = "load deadline"
    out.latency_s = time.monotonic() - started
    return out


# ----------------------------------------------------------------------------- a load


@dataclass
class LoadReport:
    runs: int
    outcomes: list[Outcome]
    wall_s: float
    execute_503: int  # cells execute refused as saturated (infer waited and re-sent them)
    rss_peak_mb: float  # execute process tree, VmHWM summed

    @property
    def completed(self) -> int:
        return sum(o.status == "completed" for o in self.outcomes)

    @property
    def wrong(self) -> int:
        return sum(o.answer != secret(o.index) for o in self.outcomes)

    @property
    def leaked(self) -> int:
        """Answers that are some other run's secret."""
        others = {secret(o.index) for o in self.outcomes}
        return sum(o.answer in others and o.answer != secret(o.index) for o in self.outcomes)

    @property
    def refused(self) -> int:
        return sum(o.refused for o in self.outcomes)

    @property
    def timeouts(self) -> int:
        return sum(o.timeout for o in self.outcomes)

    @property
    def http_5xx(self) -> int:
        return sum(o.http_5xx for o in self.outcomes)

    def latency(self, percent: float) -> float:
        """The run latency (seconds, Retry-After waits included) at this percentile."""
        values = sorted(o.latency_s for o in self.outcomes)
        return values[min(len(values) - 1, round(percent / 100 * (len(values) - 1)))]

    def problems(self) -> list[str]:
        """What went wrong, in words; empty when the load was served correctly."""
        bad = [f"run {o.index}: {o.status} {o.answer!r} {o.error or ''}" for o in self.outcomes
               if o.status != "completed" or o.answer != secret(o.index)]  # fmt: skip
        if self.timeouts or self.http_5xx:
            bad.append(f"{self.timeouts} timeouts, {self.http_5xx} 5xx answers")
        missing = sum(o.without_retry_after for o in self.outcomes)
        if missing:
            bad.append(f"{missing} 429/503 answers without Retry-After")
        return bad


def drive(stack: Stack, runs: int, chars: int = 20_000, timeout_s: float = 240.0) -> LoadReport:
    """`runs` concurrent runs, each on its own context; bounded by `timeout_s` in all."""
    before = saturated_count(stack.execute.url)
    outcomes: list[Outcome | None] = [None] * runs
    deadline = time.monotonic() + timeout_s
    limits = httpx.Limits(max_connections=runs + 4, max_keepalive_connections=0)
    started = time.monotonic()
    with httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10), limits=limits) as client:

        def work(i: int) -> None:
            outcomes[i] = one_run(client, stack.infer.url, i, chars, deadline)

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(runs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()) + 5)
    wall = time.monotonic() - started
    done = [o or Outcome(i, status="client thread still running") for i, o in enumerate(outcomes)]
    return LoadReport(
        runs=runs,
        outcomes=done,
        wall_s=wall,
        execute_503=saturated_count(stack.execute.url) - before,
        rss_peak_mb=tree_peak_rss_kb(stack.execute.process.pid) / 1024,
    )


def saturated_count(execute_url: str) -> int:
    """Cells this execute process refused with 503 (from its /metrics)."""
    text = httpx.get(execute_url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith('wasm_execution_requests_total{outcome="saturated"}'):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def tree_peak_rss_kb(pid: int) -> int:
    """VmHWM (peak resident set) of `pid` and its descendants, summed, in KiB."""
    total = 0
    for p in process_tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total


# ----------------------------------------------------------------------------- no warm cache


def restarting(stack: Stack, policy: Policy) -> tuple[Policy, list[float]]:
    """`policy`, with execute replaced by a fresh process before every root turn, so every cell
    lands on a process that holds no session, state or context; also the restart times."""
    starts: list[float] = []

    def wrapped(request: ModelRequest) -> str:
        if request.is_root:
            starts.append(stack.restart("execute"))
        return policy(request)

    return wrapped, starts


def cell_seconds(result: dict) -> list[float]:
    """Wall time of each cell as infer saw it (409s, re-sends and retries included)."""
    return [e["seconds"] for e in result.get("trajectory") or [] if e["kind"] == "cell"]

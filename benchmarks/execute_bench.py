"""Execute-plane benchmark: the function as a real process, measured over loopback HTTP.

    python benchmarks/execute_bench.py [--quick]

Prints one table: medians with min-max over repeated runs, next to native exec() of the same
code measured in the same run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.table import print_table
from functions.contract import context_ref, new_scope
from functions.testing.processes import free_port, serve

ROWS: list[tuple[str, str, str, str]] = []
SETTLE_S = 3.0
SCOPE = new_scope()  # the run that owns the sessions and blobs, as infer sends it with each cell


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def row(name: str, samples: list[float], unit: str = "ms", note: str = "") -> float:
    scale = 1000 if unit == "ms" else 1
    med = statistics.median(samples) * scale
    ROWS.append((name, f"{med:,.1f} {unit}",
                 f"{min(samples) * scale:,.1f}-{max(samples) * scale:,.1f}", note))  # fmt: skip
    return med


def post(client: httpx.Client, url: str, body: dict) -> dict:
    r = client.post(url + "/execute", json={"scope": SCOPE, **body}, timeout=300)
    r.raise_for_status()
    return r.json()


class Follow:
    """A caller of one session: sends the state ref it last got, and the context by ref."""

    def __init__(self, client: httpx.Client, url: str, sid: str, context: dict | None = None):
        self.client, self.url, self.sid, self.ref = client, url, sid, None
        self.context = context

    def cell(self, code: str) -> dict:
        body: dict = {"code": code, "session_id": self.sid}
        if self.ref:
            body["state"] = {"ref": self.ref}
        if self.context:
            body["rlm_context"] = self.context
        result = post(self.client, self.url, body)
        self.ref = result["state"]["ref"]
        if self.context:
            self.context = {"ref": self.context["ref"]}  # sent once; by reference from now on
        return result


class KeepAlive:
    """The leanest HTTP/1.1 client: one stdlib keep-alive connection, so the figure is the
    function's, not a client library's (httpx adds ~1 ms per request here; both are printed)."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=300)

    def post(self, path: str, body: dict) -> dict:
        self.connection.request(
            "POST", path, json.dumps(body), {"content-type": "application/json"}
        )
        response = self.connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {data[:200]!r}")
        return json.loads(data)

    def close(self) -> None:
        self.connection.close()


def rss_mb(client: httpx.Client, url: str) -> float:
    text = client.get(url + "/metrics").text
    line = next(ln for ln in text.splitlines() if ln.startswith("wasm_memory_usage_bytes "))
    return float(line.split()[1]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    n = 60 if args.quick else 300
    logs = Path(tempfile.mkdtemp())
    pod_a = serve("execute", {}, logs, ready="/health/readiness")
    pod_b = serve("execute", {}, logs, ready="/health/readiness")
    client = httpx.Client()
    try:
        # Warm cell: a live session, trivial code.
        first = post(client, pod_a.url, {"code": "x = 0", "session_id": "warm"})
        ref = first["state"]["ref"]
        time.sleep(SETTLE_S)  # the pod opens its next spare interpreter in the background
        body = {"code": "x += 1", "session_id": "warm", "state": {"ref": ref}, "scope": SCOPE}

        lean = KeepAlive(pod_a.url)

        def warm_cell() -> None:
            nonlocal ref
            body["state"] = {"ref": ref}
            ref = lean.post("/execute", body)["state"]["ref"]

        def warm_cell_httpx() -> None:
            nonlocal ref
            body["state"] = {"ref": ref}
            ref = post(client, pod_a.url, body)["state"]["ref"]

        warm = row("warm cell over HTTP (p50)", timed(warm_cell, n))
        row("  the same with an httpx client", timed(warm_cell_httpx, n),
            note="what infer's executor sees")  # fmt: skip
        lean.close()
        namespace: dict = {"x": 0}
        native = row("  native exec() of the same cell", timed(
            lambda: exec("x += 1", namespace), n))  # fmt: skip
        ROWS[-3] = (*ROWS[-3][:3], f"{warm / max(native, 1e-6):,.0f}x native; target <= 5 ms")

        # Cold start: a new process with the compiled cache -> first cell result.
        def cold() -> None:
            port = free_port()
            started = time.perf_counter()
            served = serve("execute", {}, logs, port=port, ready="/health")
            post(client, served.url, {"code": "print(1)"})
            cold_samples.append(time.perf_counter() - started)
            served.stop()

        cold_samples: list[float] = []
        for _ in range(3 if args.quick else 5):
            cold()
        row("cold start: new process -> first cell", cold_samples, "s", note="target <= 2 s")

        # Restore: 10 MB of state, on a pod that does not hold the session.
        make = (
            "import random\nrandom.seed(1)\n"
            "rows = [''.join(random.choices('abcdefghij', k=100)) for _ in range(100_000)]"
        )
        made = post(client, pod_a.url, {"code": make, "session_id": "big", "return_state": True})
        state = made["state"]
        raw = post(
            client,
            pod_a.url,
            {
                "code": "import pickle\nprint(len(pickle.dumps(rows)))",
                "session_id": "big",
                "state": {"ref": state["ref"]},
            },
        )
        size_mb = int(raw["stdout"]) / 2**20
        restores, server_side = [], []
        for i in range(3 if args.quick else 8):
            sid = f"restore-{i}"
            # First transfer of the blob to pod B (the caller re-sends data after a 409)...
            post(
                client,
                pod_b.url,
                {
                    "code": "1",
                    "session_id": sid,
                    "state": {"ref": state["ref"], "data": state["data"]},
                },
            )
            # ...then the session is gone from pod B's memory but its blob is cached: restore.
            client.post(pod_b.url + "/execute", json={"code": "1", "session_id": sid + "-x",
                        "state": {"ref": state["ref"]}, "scope": SCOPE})  # fmt: skip
            time.sleep(SETTLE_S)  # a pod at rest: its spare interpreter refilled
            started = time.perf_counter()
            result = post(
                client,
                pod_b.url,
                {"code": "len(rows)", "session_id": sid + "-y", "state": {"ref": state["ref"]}},
            )
            restores.append(time.perf_counter() - started)
            server_side.append(result["execution_time"])
        row(f"restore {size_mb:.1f} MB state on another pod", restores,
            note="target <= 300 ms")  # fmt: skip
        row("  of which in the sandbox", server_side)

        # A 50 MB context by reference vs no context: each caller follows its session's ref.
        text = "word " * (10 * 2**20)
        with_context = Follow(client, pod_a.url, "ctx", {"ref": context_ref(text), "data": text})
        plain = Follow(client, pod_a.url, "noctx")
        with_context.cell("y = 1")
        plain.cell("y = 1")
        time.sleep(SETTLE_S)
        with_ctx = row(
            "cell with a 50 MB context by ref", timed(lambda: with_context.cell("y += 1"), n)
        )
        without = row("cell with no context", timed(lambda: plain.cell("y += 1"), n))
        ROWS[-2] = (*ROWS[-2][:3], f"{with_ctx / without:.2f}x of no context; target <= 1.2x")

        # Memory: an idle worker, then per live session.
        pod_c = serve("execute", {}, logs, ready="/health/readiness")
        time.sleep(1)
        idle = rss_mb(client, pod_c.url)
        count = 10
        for i in range(count):
            post(client, pod_c.url, {"code": "data = list(range(1000))", "session_id": f"m{i}"})
        time.sleep(1)
        per = (rss_mb(client, pod_c.url) - idle) / count
        ROWS.append(("host RSS of an idle worker", f"{idle:,.0f} MB", "", ""))
        ROWS.append(("added RSS per live session", f"{per:,.1f} MB", "",
                     f"over {count} sessions; target <= 50 MB + data"))  # fmt: skip
        pod_c.stop()
    finally:
        pod_a.stop()
        pod_b.stop()
    print_table(ROWS)


if __name__ == "__main__":
    main()

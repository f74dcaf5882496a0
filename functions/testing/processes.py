"""Starting the functions as real processes on loopback, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from functions.local import PACKAGE, command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, parents before children (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in task.read_text().split()]
    return found


@dataclass
class Served:
    url: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL the process and its children (gunicorn's worker would finish its requests)."""
        for pid in reversed(process_tree(self.process.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


# Execute posts sub-calls only under EXECUTE_CALLBACK_ORIGINS; on one machine infer is on some
# loopback port. A test that checks the origins, or runs infer elsewhere, sets its own.
LOOPBACK_DEFAULTS = {"execute": {"EXECUTE_CALLBACK_ORIGINS": "http://127.0.0.1:*"}}


def serve(
    plane: str,
    env: dict[str, str],
    log_dir: Path,
    port: int | None = None,
    ready: str = "/health",
    timeout_s: float = 60,
    host: str = "127.0.0.1",
    prefix: Sequence[str] = (),
) -> Served:
    """Start one function under functions-framework on `host` (loopback by default), its
    command run through `prefix` if given (`ip netns exec NAME`); wait until `ready` answers."""
    port = port or free_port()
    log = log_dir / f"{plane}-{port}.log"
    process = subprocess.Popen(
        [*prefix, *command(plane, host, port)],
        cwd=PACKAGE.parent,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **LOOPBACK_DEFAULTS.get(plane, {}), **env},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    served = Served(f"http://{host}:{port}", process, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{plane} exited: {served.output()[-2000:]}")
        try:
            if httpx.get(served.url + ready, timeout=2).status_code == 200:
                return served
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    served.stop()
    raise RuntimeError(f"{plane} did not become ready: {served.output()[-2000:]}")

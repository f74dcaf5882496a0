"""A real Redis (Debian's `redis-server`) on a loopback port, for the run ledger's tests."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from functions.testing.processes import free_port

PASSWORD = "ledger-test-password"


class RedisServer:
    """`argv`: the whole command line (it must listen on `port`); by default a throwaway Redis
    with PASSWORD, no persistence."""

    def __init__(
        self, workdir: Path, port: int | None = None, argv: list[str] | None = None
    ) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (Debian package redis-server)")
        self.workdir = workdir
        self.port = port or free_port()
        self.argv = argv
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        argv = self.argv or (
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--requirepass", PASSWORD, "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)]
        )  # fmt: skip
        self.process = subprocess.Popen(
            argv,
            cwd=self.workdir,
            stdout=(self.workdir / f"redis-{self.port}.log").open("ab"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log = self.workdir / f"redis-{self.port}.log"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {log.read_text()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(10)
        self.process = None

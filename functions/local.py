"""Serving the functions on this machine: the command for one (the tests' processes, the
benchmarks), and `rlm serve`, both wired together in a process group of their own.

`rlm serve` compiles the sandbox first if it must (with progress), starts execute and infer in
one new process group, and names their URLs once both answer. SIGINT or SIGTERM (Ctrl-C,
`kill`, systemd, a container runtime) stops the whole group: SIGTERM lets each function finish
cleanly, and whatever is left after `GRACE_S` gets SIGKILL; a second signal does not wait.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import httpx

PACKAGE = Path(__file__).resolve().parent
GRACE_S = 3.0  # how long the functions get to stop after SIGTERM before SIGKILL
READY_TIMEOUT_S = 120.0  # for both functions to answer, once the sandbox is compiled
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def command(plane: str, host: str, port: int) -> list[str]:
    source = PACKAGE / plane / "main.py"
    return [sys.executable, "-m", "functions_framework", "--source", str(source),
            "--target", plane, "--host", host, "--port", str(port)]  # fmt: skip


class ServeError(Exception):
    """`rlm serve` cannot start as asked (a port in use, too few threads): one line, exit 2."""


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080  # infer's
    execute_port: int = 8081
    max_runs: int = 8
    threads: int = 0  # each function's; 0: enough for `max_runs` at the deployment's depth


def threads_for(runs: int, run_bound: object) -> int:
    """The fewest server threads with which infer takes `runs` runs at once
    (`run_bound` is `InferSettings.run_bound`, which owns that arithmetic)."""
    threads = 3
    while run_bound(threads) < runs:  # type: ignore[operator]
        threads += 1
    return threads


class Stopped(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived: stop everything and exit 0."""


class ProcessGroup:
    """Processes started in one new process group, stopped together."""

    def __init__(self) -> None:
        self.pgid: int | None = None
        self.processes: list[subprocess.Popen] = []
        self.hurry = False  # a second signal: SIGKILL without waiting

    def start(self, argv: list[str], env: Mapping[str, str], **kwargs: object) -> subprocess.Popen:
        process = subprocess.Popen(
            argv,
            env=dict(env),
            cwd=PACKAGE.parent,
            process_group=0 if self.pgid is None else self.pgid,
            preexec_fn=_die_with_parent,
            **kwargs,  # type: ignore[arg-type]
        )
        if self.pgid is None:
            self.pgid = process.pid
        self.processes.append(process)
        return process

    def running(self) -> bool:
        """Whether any process of the group is left (children reaped, grandchildren too)."""
        for process in self.processes:
            process.poll()
        if self.pgid is None:
            return False
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # the group id was reused by someone else's process
            return False
        return True

    def signal(self, signum: int) -> None:
        if self.pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, signum)

    def stop(self, grace_s: float = GRACE_S) -> None:
        """SIGTERM to all, SIGKILL to what is left after `grace_s` (at once when hurried)."""
        if not self.running():
            return
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self.running() and time.monotonic() < deadline and not self.hurry:
            time.sleep(0.05)
        if self.running():
            self.signal(signal.SIGKILL)
            deadline = time.monotonic() + 5
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.05)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(1)


def serve(options: ServeOptions, env: Mapping[str, str], say: object = print) -> int:
    """Run both functions until a signal; 0 after a signal, 1 if a function exits by itself.

    Raises `ServeError` for options that cannot work, before anything starts.
    """
    from functions.infer.settings import InferSettings
    from functions.progress import loading_sandbox, make_console, wait_for

    if options.port == options.execute_port:
        raise ServeError(f"infer and execute cannot share port {options.port}")
    execute_url = f"http://{options.host}:{options.execute_port}"
    infer_url = f"http://{options.host}:{options.port}"
    env = {**env, "WASM_SERVICE_URL": execute_url, "INFER_CALLBACK_URL": infer_url,
           "EXECUTE_CALLBACK_ORIGINS": infer_url}  # fmt: skip
    settings = InferSettings.from_env(env)  # a ConfigError names the variable to fix
    threads = options.threads or threads_for(options.max_runs, settings.run_bound)
    runs = min(options.max_runs, settings.run_bound(threads))
    if runs < options.max_runs:
        need = threads_for(options.max_runs, settings.run_bound)
        raise ServeError(
            f"--threads {threads} serves at most {runs} runs at MAX_DEPTH {settings.max_depth}: "
            f"give --threads {need} or fewer --max-runs"
        )
    _check_port_free(options.host, options.port, "--port")
    _check_port_free(options.host, options.execute_port, "--execute-port")
    env.update(INFER_MAX_RUNS=str(runs), THREADS=str(threads), WORKERS="1", PYTHONUNBUFFERED="1")
    console = make_console()
    warming, group = ProcessGroup(), ProcessGroup()
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in STOP_SIGNALS}
    started = time.monotonic()
    try:
        warm = [sys.executable, "-m", "functions.execute.warm"]
        compile_sandbox = warming.start(warm, env, stdout=subprocess.DEVNULL)
        loading_sandbox(compile_sandbox.wait, console)
        if compile_sandbox.returncode != 0:
            say("rlm: the sandbox did not load; `rlm warm` shows why")
            return 1
        execute = group.start(command("execute", options.host, options.execute_port), env)
        infer = group.start(command("infer", options.host, options.port), env)
        wait_for(
            lambda: _until_ready([(execute, execute_url + "/health/readiness"),
                                  (infer, infer_url + "/health")]),
            "starting execute and infer", "starting execute and infer", 30.0, console=console,
        )  # fmt: skip
        say(
            f"rlm serve: ready in {time.monotonic() - started:.1f} s\n"
            f"  infer    {infer_url}/infer  (also {infer_url}/v1/chat/completions)\n"
            f"  execute  {execute_url}/execute\n"
            f"  {runs} runs at once, {threads} threads each; model {settings.model} at "
            f"{settings.base_url}\n"
            "Ctrl-C (or SIGTERM) stops both."
        )
        while execute.poll() is None and infer.poll() is None:
            time.sleep(0.2)
        name, gone = ("execute", execute) if execute.poll() is not None else ("infer", infer)
        say(f"rlm: {name} exited with code {gone.returncode}; stopping the other")
        return 1
    except Stopped:
        return 0
    finally:
        for sig in STOP_SIGNALS:  # a second signal while stopping: do not wait
            signal.signal(sig, lambda *_: setattr(group, "hurry", True))
        warming.stop()
        group.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _until_ready(checks: list[tuple[subprocess.Popen, str]]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    pending = list(checks)
    while pending:
        process, url = pending[0]
        if process.poll() is not None:
            raise ServeError(f"{url.split('/health')[0]} exited with code {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                pending.pop(0)
                continue
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise ServeError(f"{url} did not answer within {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.1)


def _check_port_free(host: str, port: int, flag: str) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ServeError(f"{host}:{port} is not free ({e.strerror}): pass {flag}") from None


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signal.Signals(signum).name)


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when `rlm serve` dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

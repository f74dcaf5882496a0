"""Running one cell: sessions, state and context by reference, limits. No HTTP here.

`CellRunner.run` turns an `ExecuteRequest` into an `ExecuteResponse`, or raises one of the
errors below, each of which the API maps to a 4xx/503 with a message.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import queue
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from pydantic import ValidationError

from functions.contract import (
    Answer,
    ContextRef,
    ErrorInfo,
    ExecuteRequest,
    ExecuteResponse,
    LocalInfo,
    StateOut,
    SubcallSummary,
    ToolSpec,
    context_bytes,
    sha256_hex,
)
from functions.errors import Conflict, Unavailable, Unprocessable
from functions.execute import metrics
from functions.execute.cache import LRU
from functions.execute.sandbox import TRAP_CANCELLED, TRAP_DEADLINE, TRAP_FUEL, Interpreter
from functions.execute.settings import ExecuteSettings
from functions.execute.subcalls import CellScope, HttpTransport, SubcallGate, Transport

log = logging.getLogger("rlm.execute")

_TRUNCATED = "\n[... {stream} truncated: more than {limit} bytes were written ...]\n"
_SESSION_OVERHEAD = 48 << 20  # what an idle interpreter costs the pod, roughly


class MissingRefs(Conflict):
    """A ref this pod does not hold came without its data: the caller re-sends with data."""

    def __init__(self, missing: list[str]) -> None:
        message = f"this pod does not hold {' and '.join(missing)}: re-send with data"
        super().__init__(message, body={"missing": missing, "error": message})
        self.missing = missing


class BadCell(Unprocessable, ValueError):
    """The request is well-formed JSON but cannot be run as given."""


class Saturated(Unavailable):
    """Every slot is busy; the caller retries after a pause."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{message}; retry shortly")


@dataclass
class Live:
    """A live session: the interpreter and what its namespace currently holds."""

    interpreter: Interpreter
    gate: SubcallGate
    state_ref: str | None = None
    context_ref: str | None = None
    size: int = _SESSION_OVERHEAD
    contexts: tuple[str, ...] = ()  # refs bound to context_0, context_1, ...

    def close(self) -> None:
        self.interpreter.close()


@dataclass
class _Plan:
    inputs: dict[str, bytes] = field(default_factory=dict)
    restore: bool = False
    context_kind: str | None = None
    contexts: list[tuple[int, str]] | None = None  # (index, kind) bound as context_<index>
    context_count: int = 0


class CellRunner:
    def __init__(self, settings: ExecuteSettings, transport: Transport | None = None) -> None:
        self.settings = settings
        self.transport = transport or HttpTransport(settings.subcall_timeout_s)
        self.blobs: LRU[bytes] = LRU(settings.cache_bytes // 4)
        self.contexts: LRU[tuple[bytes, str]] = LRU(settings.cache_bytes // 4)
        self.sessions: LRU[Live] = LRU(
            settings.cache_bytes // 2, settings.max_sessions, on_evict=self._evicted
        )
        self._slots = threading.BoundedSemaphore(settings.slots)
        self._session_locks = KeyedLocks()
        self._spares: queue.SimpleQueue[Live] = queue.SimpleQueue()
        self._refilling = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ public

    def run(self, request: ExecuteRequest, traceparent: str | None = None) -> ExecuteResponse:
        if not self._slots.acquire(timeout=self.settings.queue_wait_s):
            raise Saturated("all sandbox slots are busy")
        lease = SlotLease(self._slots)
        try:
            if request.session_id is None:
                return self._run_once(request, traceparent, lease)
            with self._session_locks.hold(request.session_id):
                return self._run_in_session(request, traceparent, lease)
        finally:
            lease.end()
            self._top_up()

    def prewarm(self) -> None:
        """Open one interpreter ahead of need (the first request then skips the ~1 s start)."""
        self._spares.put(self._open())

    def close(self) -> None:
        self._closed = True
        self.sessions.clear()
        while not self._spares.empty():
            self._spares.get().close()

    # ------------------------------------------------------------------ paths

    def _run_once(
        self, request: ExecuteRequest, traceparent: str | None, lease: SlotLease
    ) -> ExecuteResponse:
        plan = _Plan()
        self._add_context(request, None, plan)
        self._add_contexts(request, None, plan)
        live = self._take_spare()
        try:
            response, _ = self._turn(live, request, plan, traceparent, lease, snapshot=False)
        finally:
            live.close()
        return response

    def _run_in_session(
        self, request: ExecuteRequest, traceparent: str | None, lease: SlotLease
    ) -> ExecuteResponse:
        sid = request.session_id
        assert sid is not None
        live = self.sessions.pop(sid)
        want = request.state.ref if request.state else None
        if live is not None and (not live.interpreter.alive or live.state_ref != want):
            live.close()
            live = None
        plan = _Plan()
        missing: list[str] = []
        if live is None and want is not None:
            blob = self._state_blob(request)
            if blob is None:
                missing.append("state")
            else:
                plan.inputs["state.in"], plan.restore = blob, True
        if not self._add_context(request, live, plan):
            missing.append("rlm_context")
        if not self._add_contexts(request, live, plan):
            missing.append("rlm_contexts")
        if missing:
            if live is not None:
                self.sessions.put(sid, live, live.size)
            raise MissingRefs(missing)

        live = live or self._take_spare()
        try:
            response, meta = self._turn(live, request, plan, traceparent, lease, snapshot=True)
        except BaseException:
            live.close()
            raise
        if meta.get("load_failed"):
            live.close()
            raise BadCell(f"the state or context could not be loaded: {response.error.message}")
        if response.trapped or not live.interpreter.alive:
            live.close()
            response.session_reset = True
            response.stderr += (
                f"\n[session reset: the cell was stopped ({response.trapped or 'interpreter exit'})"
                "; variables are as they were before this cell]\n"
            )
            response.state = StateOut(ref=want, size=0) if want else None
            if want and request.return_state:
                blob = self.blobs.get(want)
                response.state.data = pack_state(blob) if blob else None
            return response
        if request.rlm_context:
            live.context_ref = request.rlm_context.ref
        if request.rlm_contexts is not None:
            live.contexts = tuple(c.ref for c in request.rlm_contexts)
        live.state_ref = response.state.ref if response.state else None
        # What the interpreter holds, roughly: its base, the unpickled state, the decoded context.
        held = self.contexts.get(live.context_ref) if live.context_ref else None
        context_size = len(held[0]) if held else 0
        for ref in set(live.contexts) - {live.context_ref}:
            other = self.contexts.get(ref)
            context_size += len(other[0]) if other else 0
        live.size = _SESSION_OVERHEAD + 2 * (int(meta.get("raw_state_size") or 0) + context_size)
        self.sessions.put(sid, live, live.size)
        return response

    # ------------------------------------------------------------------ pieces

    def _state_blob(self, request: ExecuteRequest) -> bytes | None:
        state = request.state
        assert state is not None
        if state.data is None:
            return self.blobs.get(state.ref)
        blob = unpack_state(state.data, self.settings.max_state_bytes)
        if sha256_hex(blob) != state.ref:
            raise BadCell("state.data does not match state.ref (sha256 of the uncompressed pickle)")
        self.blobs.put(state.ref, blob, len(blob))
        return blob

    def _add_context(self, request: ExecuteRequest, live: Live | None, plan: _Plan) -> bool:
        """Put the RLM context (and seed variables) into the plan; False if the pod lacks it."""
        rc = request.rlm_context
        if rc is None or (live is not None and live.context_ref == rc.ref):
            return True
        held = self._context_data(rc, "rlm_context")
        if held is None:
            return False
        plan.inputs["context.in"], plan.context_kind = held
        return True

    def _add_contexts(self, request: ExecuteRequest, live: Live | None, plan: _Plan) -> bool:
        """A conversation's contexts as context_0, context_1, ...; False if the pod lacks one."""
        wanted = request.rlm_contexts
        if wanted is None:
            return True
        refs = tuple(c.ref for c in wanted)
        have = live.contexts if live is not None else ()
        if have == refs:
            return True
        start = len(have) if refs[: len(have)] == have else 0
        current = request.rlm_context.ref if request.rlm_context else None
        plan.contexts = []
        for index in range(start, len(wanted)):
            if wanted[index].ref == current:  # the same value as `context`: bound, not sent twice
                plan.contexts.append((index, "alias"))
                continue
            held = self._context_data(wanted[index], "rlm_contexts")
            if held is None:
                return False
            plan.inputs[f"context_{index}.in"] = held[0]
            plan.contexts.append((index, held[1]))
        plan.context_count = len(wanted)
        return True

    def _context_data(self, rc: ContextRef, field_name: str) -> tuple[bytes, str] | None:
        """A context's canonical bytes and kind ("text" or "json"), from the request or cache."""
        if rc.data is None:
            return self.contexts.get(rc.ref)
        data = context_bytes(rc.data)
        if hashlib.sha256(data).hexdigest() != rc.ref:
            raise BadCell(
                f"{field_name}.data does not match its ref: the ref is the sha256 of "
                "the text's UTF-8, or of compact sorted-key JSON for other values"
            )
        kind = "text" if isinstance(rc.data, str) else "json"
        self.contexts.put(rc.ref, (data, kind), len(data))
        return data, kind

    def _turn(
        self,
        live: Live,
        request: ExecuteRequest,
        plan: _Plan,
        traceparent: str | None,
        lease: SlotLease,
        snapshot: bool,
    ) -> tuple[ExecuteResponse, dict]:
        s = self.settings
        limits = request.limits
        deadline = min(limits.deadline_s or request.timeout or s.deadline_s, s.max_deadline_s)
        fuel = min(limits.fuel or s.fuel, s.fuel)
        output = min(limits.output_bytes or s.output_bytes, s.output_bytes)
        max_subcalls = min(
            s.max_subcalls if limits.max_subcalls is None else limits.max_subcalls, s.max_subcalls
        )
        cell = {"restore": plan.restore, "context": plan.context_kind, "snapshot": snapshot}
        if plan.contexts is not None:
            cell["contexts"], cell["context_count"] = plan.contexts, plan.context_count
        if request.context:
            cell["vars"] = request.context
        if request.return_state:
            cell["force_state"] = True
        if request.callback and request.callback.tools:
            cell["tools"] = {n: _tool_doc(t) for n, t in request.callback.tools.items()}
        scope = live.gate.scope = CellScope(
            callback=request.callback,
            max_subcalls=max_subcalls,
            headers={"traceparent": traceparent} if traceparent else {},
            pause=lease.pause,
            resume=lease.resume,
        )
        started = time.perf_counter()
        result = live.interpreter.turn(
            cell, request.code, plan.inputs, deadline_s=deadline, fuel=fuel, output_bytes=output,
            cancel=scope.cancel,
        )  # fmt: skip
        elapsed = time.perf_counter() - started
        metrics.observe_cell(elapsed, result.trapped)

        stdout = result.stdout.decode("utf-8", "replace")
        stderr = result.stderr.decode("utf-8", "replace")
        if "stdout" in result.truncated:
            stdout += _TRUNCATED.format(stream="stdout", limit=output)
        if "stderr" in result.truncated:
            stderr += _TRUNCATED.format(stream="stderr", limit=output)
        meta = _read_meta(result.report)
        response = ExecuteResponse(
            stdout=stdout,
            stderr=stderr,
            execution_time=elapsed,
            subcalls=live.gate.scope.summary or SubcallSummary(),
            trapped=_trap_name(result.trapped),
        )
        live.gate.scope = CellScope()
        if result.trapped:
            response.error = ErrorInfo(
                type="TimeoutError" if result.trapped == TRAP_DEADLINE else "ResourceError",
                message=_trap_message(result.trapped, deadline, fuel),
            )
            return response, meta
        if not meta:
            response.error = ErrorInfo(
                type="SystemExit", message="the cell ended the interpreter (exit or os._exit)"
            )
            return response, meta
        try:
            if meta.get("error"):
                response.error = ErrorInfo.model_validate(meta["error"])
            if meta.get("answer"):
                response.answer = Answer.model_validate(meta["answer"])
            response.locals = {
                str(k): LocalInfo.model_validate(v) for k, v in (meta.get("locals") or {}).items()
            }
        except ValidationError:
            response.error = ErrorInfo(
                type="ProtocolError", message="the cell's report was malformed"
            )
        if snapshot:
            blob = result.outputs.get("state.out")
            if blob is None and isinstance(meta.get("state_inline"), str):
                try:
                    blob = base64.b64decode(meta["state_inline"], validate=True)
                except (binascii.Error, ValueError):
                    response.error = ErrorInfo(type="ProtocolError", message="bad inline state")
            response.state = self._new_state(live, request, blob)
        return response, meta

    def _new_state(self, live: Live, request: ExecuteRequest, blob: bytes | None) -> StateOut:
        """The state after the cell: the blob the guest wrote, or the one it had if unchanged."""
        if blob is None and live.state_ref is not None:
            blob = self.blobs.get(live.state_ref)
            if blob is None:
                return StateOut(ref=live.state_ref)
        if blob is None:
            blob = b""
        ref = sha256_hex(blob)
        if len(blob) <= self.settings.max_state_bytes:
            self.blobs.put(ref, blob, len(blob))
        inline = request.return_state or len(blob) <= self.settings.state_inline_bytes
        return StateOut(ref=ref, data=pack_state(blob) if inline else None, size=len(blob))

    def _open(self) -> Live:
        gate = SubcallGate(self.transport)
        s = self.settings
        interpreter = Interpreter(
            subcall=gate,
            memory_bytes=s.memory_bytes,
            fuel=s.fuel,
            state_cap=s.max_state_bytes,
            max_subcalls=s.max_subcalls,
            subcall_timeout_s=s.subcall_timeout_s,
            max_request_bytes=s.max_request_bytes,
            cache_dir=s.wasm_cache_dir or None,
        )
        return Live(interpreter=interpreter, gate=gate)

    def _take_spare(self) -> Live:
        try:
            live = self._spares.get_nowait()
        except queue.Empty:
            live = self._open()
        return live

    def _top_up(self) -> None:
        """Open the next spare after the cell, not while it runs: both would share the cores."""
        if self._spares.empty() and not self._closed and not self._refilling.locked():
            threading.Thread(target=self._refill, daemon=True).start()

    def _refill(self) -> None:
        if not self._refilling.acquire(blocking=False):
            return
        try:
            live = self._open()
            if self._closed:
                live.close()
            else:
                self._spares.put(live)
        except Exception:
            if not self._closed:
                log.exception("could not open a spare interpreter")
        finally:
            self._refilling.release()

    @staticmethod
    def _evicted(_sid: str, live: Live) -> None:
        live.close()


class SlotLease:
    """A cell's hold on one slot, lent out while its sub-calls wait for the infer plane.

    A sub-call the sandbox gave up on (its timeout, or the cell's deadline) goes on in its
    thread after the cell has ended: its late `resume` must not take a slot for a cell that is
    gone, and the cell's `end` must not give back a slot it had lent.
    """

    def __init__(self, slots: threading.BoundedSemaphore) -> None:
        self._slots = slots
        self._lock = threading.Lock()
        self._held = True
        self._waiting = 0  # sub-calls under way (an abandoned one may overlap the next)
        self._ended = False

    def pause(self) -> None:
        with self._lock:
            self._waiting += 1
            if self._held:
                self._held = False
                self._slots.release()

    def resume(self) -> None:
        with self._lock:
            self._waiting -= 1
            if self._waiting or self._held or self._ended:
                return
        self._slots.acquire()
        with self._lock:
            if self._held or self._ended:
                self._slots.release()
            else:
                self._held = True

    def end(self) -> None:
        with self._lock:
            self._ended = True
            if self._held:
                self._held = False
                self._slots.release()


class KeyedLocks:
    """One lock per key, alive only while someone holds or waits for it.

    Cells of one session run one at a time; cells of different sessions never wait on each
    other (a cell waiting on a child RLM must not block the child's own session).
    """

    def __init__(self) -> None:
        self._locks: dict[str, tuple[threading.Lock, int]] = {}
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (None, 0))
            lock = lock or threading.Lock()
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


def pack_state(blob: bytes) -> str:
    """state.data on the wire: the pickle, zlib-compressed, base64."""
    return base64.b64encode(zlib.compress(blob, 1)).decode("ascii")


def unpack_state(data: str, limit: int) -> bytes:
    try:
        packed = base64.b64decode(data, validate=True)
        inflater = zlib.decompressobj()
        blob = inflater.decompress(packed, limit + 1)
    except (binascii.Error, ValueError, zlib.error):
        raise BadCell("state.data is not base64 of a zlib-compressed state") from None
    if len(blob) > limit or inflater.unconsumed_tail:
        raise BadCell(f"state.data unpacks to more than {limit} bytes (EXECUTE_MAX_STATE_MB)")
    return blob


def _read_meta(raw: bytes | None) -> dict:
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _trap_name(trapped: str | None) -> str | None:
    if trapped is None:
        return None
    if trapped == TRAP_DEADLINE:
        return "deadline"
    if trapped == TRAP_FUEL:
        return "fuel"
    if "stack" in trapped:
        return "stack"
    return trapped


def _tool_doc(spec: ToolSpec) -> str:
    """A guest tool function's docstring: its signature and description."""
    return f"{spec.signature or '(...)'}\n\n{spec.description}".strip()


def _trap_message(trapped: str, deadline: float, fuel: int) -> str:
    if trapped == TRAP_CANCELLED:
        return "the run was cancelled"
    if trapped == TRAP_DEADLINE:
        return f"the cell ran past its deadline of {deadline:g} s"
    if trapped == TRAP_FUEL:
        return f"the cell used up its fuel ({fuel:,} instructions)"
    return f"the cell was stopped: {trapped}"

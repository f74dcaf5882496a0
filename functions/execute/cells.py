"""Running one cell: sessions, state and context by reference, limits. No HTTP here.

`CellRunner.run` turns an `ExecuteRequest` into an `ExecuteResponse`, or raises `MissingRefs`,
`BadCell` or `Saturated` (functions.errors), each of which the API answers with its status.

Every session and cached blob belongs to a scope: the random value a caller sends with each cell
of a run (or one the pod makes and returns). A session is found by (scope, session id), a blob by
(scope, sha256), so a cell reaches only what cells of its own scope made or sent: another
caller's session id or ref names nothing, and its 409 says nothing about other scopes. A live
interpreter is reused only for the state its last good cell produced.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import json
import logging
import queue
import secrets
import threading
import time
import zlib
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

from pydantic import ValidationError

from functions.contract import (
    Answer,
    CellContext,
    ErrorInfo,
    ExecuteRequest,
    ExecuteResponse,
    LocalInfo,
    StateOut,
    ToolSpec,
    context_bytes,
    new_scope,
    sha256_hex,
)
from functions.errors import BadCell, MissingRefs, Saturated
from functions.execute import metrics
from functions.execute.cache import LRU
from functions.execute.sandbox import (
    TRAP_CANCELLED,
    TRAP_DEADLINE,
    TRAP_FUEL,
    Interpreter,
    TurnResult,
)
from functions.execute.settings import ExecuteSettings
from functions.execute.subcalls import CellScope, HttpTransport, SubcallGate, Transport

log = logging.getLogger("rlm.execute")

_TRUNCATED = "\n[... {stream} truncated: more than {limit} bytes were written ...]\n"
_INFLATE_CHUNK = 1 << 20
# What the host keeps of the report's previews: the guest writes it, so the host bounds it.
_MAX_LOCALS, _MAX_PREVIEW = 200, 300


@dataclass
class Live:
    """A live session: the interpreter and what its namespace currently holds."""

    interpreter: Interpreter
    gate: SubcallGate
    state_ref: str | None = None  # the state its last good cell produced (or it restored)
    context_ref: str | None = None
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


class CellFailed(Exception):
    """The cell ended without a report the host can take: its interpreter is not reused."""


class CellRunner:
    def __init__(
        self,
        settings: ExecuteSettings,
        transport: Transport | None = None,
        keep_spare: bool = True,
    ) -> None:
        """`keep_spare`: open the next interpreter after each cell, so a new session starts at
        once (a pod serving many sessions); without it only `prewarm` opens one ahead."""
        self.settings = settings
        self._keep_spare = keep_spare
        self.transport = transport or HttpTransport(
            settings.subcall_timeout_s, settings.callback_origins
        )
        # Each live session is charged its interpreter's linear memory, each blob its bytes;
        # the least recently used go first. A running cell's session is out of the map.
        self.blobs: LRU[bytes] = LRU(settings.cache_bytes // 4)
        self.contexts: LRU[tuple[bytes | memoryview, str]] = LRU(settings.cache_bytes // 4)
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
            raise Saturated("all sandbox slots are busy; retry shortly")
        lease = SlotLease(self._slots)
        scope = request.scope or new_scope()
        try:
            if request.session_id is None:
                response = self._run_once(request, scope, traceparent, lease)
            else:
                with self._session_locks.hold((scope, request.session_id)):
                    response = self._run_in_session(request, scope, traceparent, lease)
        finally:
            lease.end()
            if self._keep_spare:
                self._top_up()
        response.scope = scope
        return response

    def prewarm(self, wait: bool = True) -> None:
        """Open one interpreter ahead of need (the first cell then skips the ~1 s start); with
        `wait=False` on a thread of its own, which the first cell waits for if it comes first."""
        if wait:
            self._spares.put(self._open())
        else:
            self._top_up()

    def close(self) -> None:
        self._closed = True
        self.sessions.clear()
        while not self._spares.empty():
            self._spares.get().close()

    # ------------------------------------------------------------------ paths

    def _run_once(
        self, request: ExecuteRequest, scope: str, traceparent: str | None, lease: SlotLease
    ) -> ExecuteResponse:
        plan = _Plan()
        missing = []
        if not self._add_context(request, scope, None, plan):
            missing.append("rlm_context")
        if not self._add_contexts(request, scope, None, plan):
            missing.append("rlm_contexts")
        if missing:
            raise MissingRefs(missing)
        live = self._take_spare()
        try:
            response, _ = self._turn(live, request, scope, plan, traceparent, lease, False)
        except CellFailed as failed:
            return _failed_response(failed)
        finally:
            live.close()
        return response

    def _run_in_session(
        self, request: ExecuteRequest, scope: str, traceparent: str | None, lease: SlotLease
    ) -> ExecuteResponse:
        assert request.session_id is not None
        key = (scope, request.session_id)
        live = self.sessions.pop(key)
        want = request.state.ref if request.state else None
        if live is not None and (not live.interpreter.alive or live.state_ref != want):
            live.close()  # the owner went back to another state: this namespace is not it
            live = None
        plan = _Plan()
        missing: list[str] = []
        if live is None and want is not None:
            blob = self._state_blob(request, scope)
            if blob is None:
                missing.append("state")
            else:
                plan.inputs["state.in"], plan.restore = blob, True
        if not self._add_context(request, scope, live, plan):
            missing.append("rlm_context")
        if not self._add_contexts(request, scope, live, plan):
            missing.append("rlm_contexts")
        if missing:
            if live is not None:
                self.sessions.put(key, live, live.interpreter.memory_in_use())
            raise MissingRefs(missing)

        live = live or self._take_spare()
        if plan.restore:
            live.state_ref = want
        try:
            response, meta = self._turn(live, request, scope, plan, traceparent, lease, True)
        except CellFailed as failed:
            live.close()
            return self._back_to(want, scope, request, _failed_response(failed))
        except BaseException:
            live.close()
            raise
        if meta.get("load_failed"):
            live.close()
            why = response.error.message if response.error else "the guest gave no reason"
            raise BadCell(f"the state or context could not be loaded: {why}")
        if response.trapped or not live.interpreter.alive:
            live.close()
            response.stderr += (
                f"\n[session reset: the cell was stopped ({response.trapped or 'interpreter exit'})"
                "; variables are as they were before this cell]\n"
            )
            return self._back_to(want, scope, request, response)
        if request.rlm_context:
            live.context_ref = request.rlm_context.ref
        if request.rlm_contexts is not None:
            live.contexts = tuple(c.ref for c in request.rlm_contexts)
        live.state_ref = response.state.ref if response.state else None
        self.sessions.put(key, live, live.interpreter.memory_in_use())
        return response

    def _back_to(
        self, want: str | None, scope: str, request: ExecuteRequest, response: ExecuteResponse
    ) -> ExecuteResponse:
        """The session is where it was before the cell: its interpreter is gone, and the state
        is the one the request named."""
        response.session_reset = True
        response.state = StateOut(ref=want) if want else None
        if want and response.state is not None:
            blob = self.blobs.get((scope, want))
            if blob is not None:
                response.state.size = len(blob)
                if request.return_state:
                    response.state.data = pack_state(blob)
        return response

    # ------------------------------------------------------------------ pieces

    def _state_blob(self, request: ExecuteRequest, scope: str) -> bytes | None:
        state = request.state
        assert state is not None
        if state.data is None:
            return self.blobs.get((scope, state.ref))
        blob = unpack_state(state.data, self.settings.max_state_bytes, state.ref)
        self.blobs.put((scope, state.ref), blob, len(blob))
        return blob

    def _add_context(
        self, request: ExecuteRequest, scope: str, live: Live | None, plan: _Plan
    ) -> bool:
        """Put the RLM context (and seed variables) into the plan; False if the pod lacks it."""
        rc = request.rlm_context
        if rc is None or (live is not None and live.context_ref == rc.ref):
            return True
        held = self._context_data(rc, scope, "rlm_context")
        if held is None:
            return False
        plan.inputs["context.in"], plan.context_kind = held
        return True

    def _add_contexts(
        self, request: ExecuteRequest, scope: str, live: Live | None, plan: _Plan
    ) -> bool:
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
            held = self._context_data(wanted[index], scope, "rlm_contexts")
            if held is None:
                return False
            plan.inputs[f"context_{index}.in"] = held[0]
            plan.contexts.append((index, held[1]))
        plan.context_count = len(wanted)
        return True

    def _context_data(
        self, rc: CellContext, scope: str, field_name: str
    ) -> tuple[bytes, str] | None:
        """A context's canonical bytes and kind ("text" or "json"), from the request or cache."""
        if rc.data is None:
            return self.contexts.get((scope, rc.ref))
        if isinstance(rc.data, memoryview):  # its canonical bytes, as an EXECUTE_BYTES_TYPE body
            data, kind = rc.data, rc.data_kind or "json"
        else:
            data = context_bytes(rc.data)
            kind = "text" if isinstance(rc.data, str) else "json"
        if hashlib.sha256(data).hexdigest() != rc.ref:
            raise BadCell(
                f"{field_name}.data does not match its ref: the ref is the sha256 of "
                "the text's UTF-8, or of compact sorted-key JSON for other values"
            )
        self.contexts.put((scope, rc.ref), (data, kind), len(data))
        return data, kind

    def _turn(
        self,
        live: Live,
        request: ExecuteRequest,
        scope: str,
        plan: _Plan,
        traceparent: str | None,
        lease: SlotLease,
        snapshot: bool,
    ) -> tuple[ExecuteResponse, dict]:
        """Run the cell; raises `CellFailed` when it leaves no report the host can take."""
        s = self.settings
        limits = request.limits
        deadline = min(limits.deadline_s or request.timeout or s.deadline_s, s.max_deadline_s)
        fuel = min(limits.fuel or s.fuel, s.fuel)
        output = min(limits.output_bytes or s.output_bytes, s.output_bytes)
        max_subcalls = min(
            s.max_subcalls if limits.max_subcalls is None else limits.max_subcalls, s.max_subcalls
        )
        cell = {"restore": plan.restore, "context": plan.context_kind, "snapshot": snapshot,
                "batch_bytes": s.max_batch_bytes}  # fmt: skip
        if plan.contexts is not None:
            cell["contexts"], cell["context_count"] = plan.contexts, plan.context_count
        if request.context:
            cell["vars"] = request.context
        if request.return_state:
            cell["force_state"] = True
        else:  # a larger state is kept live only: no pickle until someone asks for it
            cell["state_limit"] = s.state_inline_bytes
        if request.callback and request.callback.tools:
            cell["tools"] = {n: _tool_doc(t) for n, t in request.callback.tools.items()}
        cell_scope = live.gate.scope = CellScope(
            callback=request.callback,
            max_subcalls=max_subcalls,
            headers={"traceparent": traceparent} if traceparent else {},
            pause=lease.pause,
            resume=lease.resume,
        )
        started = time.perf_counter()
        result = live.interpreter.turn(
            cell, request.code, plan.inputs, deadline_s=deadline, fuel=fuel, output_bytes=output,
            cancel=cell_scope.cancel,
        )  # fmt: skip
        elapsed = time.perf_counter() - started
        metrics.observe_cell(elapsed, result.trapped)

        stdout = result.stdout.decode("utf-8", "replace")
        stderr = result.stderr.decode("utf-8", "replace")
        if "stdout" in result.truncated:
            stdout += _TRUNCATED.format(stream="stdout", limit=output)
        if "stderr" in result.truncated:
            stderr += _TRUNCATED.format(stream="stderr", limit=output)
        response = ExecuteResponse(
            stdout=stdout,
            stderr=stderr,
            execution_time=elapsed,
            subcalls=cell_scope.summary,
            trapped=_trap_name(result.trapped),
        )
        live.gate.scope = CellScope()
        if result.trapped:
            response.error = ErrorInfo(
                type="TimeoutError" if result.trapped == TRAP_DEADLINE else "ResourceError",
                message=_trap_message(result.trapped, deadline, fuel),
            )
            return response, {}
        if not live.interpreter.alive:
            response.error = ErrorInfo(
                type="SystemExit",
                message="the interpreter ended during the cell (exit, os._exit, or a limit "
                "reached while the host read its report)",
            )
            return response, {}
        meta = take_report(result, response)
        if snapshot and meta.get("state_live") is True and not request.return_state:
            response.state = StateOut(ref=secrets.token_hex(32), live_only=True)
        elif snapshot:
            blob = result.outputs.get("state.out")
            if blob is None and "state_inline" in meta:
                try:
                    blob = base64.b64decode(meta["state_inline"], validate=True)
                except (binascii.Error, ValueError, TypeError):
                    raise CellFailed(response, "its report held a malformed state") from None
            response.state = self._new_state(live, scope, request, blob)
        return response, meta

    def _new_state(
        self, live: Live, scope: str, request: ExecuteRequest, blob: bytes | None
    ) -> StateOut:
        """The state after the cell: the blob the guest wrote, or the one it had if unchanged.
        Its size is the host's count of its bytes."""
        if blob is None and live.state_ref is not None:
            blob = self.blobs.get((scope, live.state_ref))
            if blob is None:
                return StateOut(ref=live.state_ref)
        if blob is None:
            blob = b""
        ref = sha256_hex(blob)
        if len(blob) <= self.settings.max_state_bytes:
            self.blobs.put((scope, ref), blob, len(blob))
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
            batch_cap=s.max_batch_bytes,
            max_subcalls=s.max_subcalls,
            subcall_timeout_s=s.subcall_timeout_s,
            max_request_bytes=s.max_request_bytes,
            cache_dir=s.wasm_cache_dir or None,
        )
        return Live(interpreter=interpreter, gate=gate)

    def _take_spare(self) -> Live:
        try:
            return self._spares.get_nowait()
        except queue.Empty:
            pass
        with self._refilling:  # one is being opened: waiting for it beats opening another
            pass
        try:
            return self._spares.get_nowait()
        except queue.Empty:
            return self._open()

    def _top_up(self) -> None:
        """Open the next spare after the cell, not while it runs: both would share the cores."""
        if self._spares.empty() and not self._closed and self._refilling.acquire(blocking=False):
            threading.Thread(target=self._refill, daemon=True).start()

    def _refill(self) -> None:
        """On its own thread, holding `_refilling` (taken by `_top_up`) until it is done."""
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
    def _evicted(_key: Hashable, live: Live) -> None:
        live.close()


def take_report(result: TurnResult, response: ExecuteResponse) -> dict:
    """The driver's report onto `response`, checked and bounded by the host; `CellFailed` when
    there is none (the cell replaced the driver's writer, or overflowed stderr past its deadline),
    it came twice (the cell forged one) or it does not hold together."""
    if result.tampered:
        raise CellFailed(response, "the driver's report marker appeared more than once")
    meta = _read_meta(result.report)
    if not meta:
        raise CellFailed(response, "it left no report (the driver's writer was replaced or cut)")
    if isinstance(meta.get("state_error"), str):
        raise CellFailed(response, f"its state could not be kept: {meta['state_error'][:300]}")
    if isinstance(meta.get("driver_error"), str):
        raise CellFailed(response, f"it could not be reported ({meta['driver_error'][:300]})")
    try:
        if meta.get("error"):
            response.error = ErrorInfo.model_validate(meta["error"])
        if meta.get("answer"):
            response.answer = Answer.model_validate(meta["answer"])
        shown = list((meta.get("locals") or {}).items())[:_MAX_LOCALS]
        for name, info in shown:
            local = LocalInfo.model_validate(info)
            local.type, local.preview = local.type[:_MAX_PREVIEW], local.preview[:_MAX_PREVIEW]
            response.locals[str(name)[:_MAX_PREVIEW]] = local
    except (ValidationError, AttributeError, TypeError):
        raise CellFailed(response, "its report was malformed") from None
    return meta


def _failed_response(failed: CellFailed) -> ExecuteResponse:
    response, why = failed.args
    response.error = ErrorInfo(
        type="CellFailed",
        message=f"the cell failed: {why}; its variables are as they were before it",
    )
    response.answer, response.locals, response.state = None, {}, None
    return response


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
        self._locks: dict[Hashable, tuple[threading.Lock, int]] = {}
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
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


def unpack_state(data: str, limit: int, ref: str) -> bytes:
    """The pickle inside state.data, checked against `ref` before it is kept. A first pass
    inflates a chunk at a time, counting and hashing and keeping nothing, so a small body that
    inflates past `limit` (EXECUTE_MAX_STATE_MB) or to another ref costs the host no memory;
    only a state that passes is inflated again and kept."""
    try:
        packed = base64.b64decode(data, validate=True)
        _, digest = _inflate(packed, limit, None)
        if digest != ref:
            raise BadCell("state.data does not match state.ref (sha256 of the uncompressed pickle)")
        kept = io.BytesIO()
        _inflate(packed, limit, kept)
    except (binascii.Error, ValueError, zlib.error):
        raise BadCell("state.data is not base64 of a zlib-compressed state") from None
    return kept.getvalue()


def _inflate(packed: bytes, limit: int, into: io.BytesIO | None) -> tuple[int, str]:
    """Inflate `packed` a chunk at a time: its size and sha256, each chunk written `into`."""
    inflater = zlib.decompressobj()
    digest = hashlib.sha256()
    size, rest = 0, packed
    while True:
        chunk = inflater.decompress(rest, _INFLATE_CHUNK)
        rest = inflater.unconsumed_tail
        last = inflater.eof or (not rest and len(chunk) < _INFLATE_CHUNK)
        if last:
            chunk += inflater.flush()
        size += len(chunk)
        if size > limit:
            raise BadCell(f"state.data unpacks to more than {limit} bytes (EXECUTE_MAX_STATE_MB)")
        digest.update(chunk)
        if into is not None:
            into.write(chunk)
        if last:
            break
    return size, digest.hexdigest()


def _read_meta(raw: bytes | None) -> dict:
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
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

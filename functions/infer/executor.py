"""How infer reaches the execute plane: over HTTP, or in this process when embedded.

`ReplSession` is one REPL session as infer sees it: the refs it last had, and the log of cells
with the sub-call answers they got, so a session a pod lost can be rebuilt by replay.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from pydantic import ValidationError

from functions import http
from functions.contract import (
    EXECUTE_BYTES_TYPE,
    Callback,
    CellContext,
    ExecuteRequest,
    ExecuteResponse,
    Limits,
    Missing,
    StateRef,
    context_bytes,
    context_ref,
    framed,
    new_scope,
)
from functions.errors import BadCell, MissingRefs, RLMError, Saturated, UpstreamError


class ExecuteError(UpstreamError):
    """The execute plane could not run the cell (after retries), or refused it."""


class Executor(Protocol):
    def run(self, request: ExecuteRequest, traceparent: str | None = None) -> ExecuteResponse: ...


def run_until_free(
    attempt: Callable[[], ExecuteResponse], busy_for_s: float, backoff_s: float = 0.25
) -> ExecuteResponse:
    """Run `attempt`, the one place both executors decide what execute's refusals mean.

    `MissingRefs` goes to the session, which re-sends data. A saturated pod (`Saturated`, 503)
    is asked again after its Retry-After for as long as the cell's own deadline: saturation is
    normal under load, not a failure. Any other refusal (`BadCell`, 422) fails the cell.
    """
    busy_until = time.monotonic() + busy_for_s
    for attempt_number in itertools.count():
        try:
            return attempt()
        except MissingRefs:
            raise
        except Saturated as e:
            wait = min(4.0, backoff_s * 2**attempt_number) * (0.5 + random.random())
            wait = max(wait, _seconds(e.headers.get("Retry-After")))
            if time.monotonic() + wait >= busy_until:
                raise ExecuteError(f"the execute plane stayed busy: {e}") from None
            time.sleep(wait)
        except BadCell as e:
            raise ExecuteError(f"the execute plane refused the cell: {e}") from None
    raise AssertionError("unreachable")


class RemoteExecutor:
    """POSTs cells to an execute function; retries what is safe to retry.

    A cell re-sent with the same state ref is safe: the pod either still holds the session at
    that ref or rebuilds it from the ref, so the cell runs on the same variables. A saturated
    pod is asked again (`run_until_free`); a failed connection or a 502/504 `retries` times.
    """

    def __init__(
        self,
        url: str,
        timeout_s: float = 900.0,
        retries: int = 6,
        backoff_s: float = 0.25,
        max_backoff_s: float = 4.0,
    ) -> None:
        self.url = url.rstrip("/") + "/execute"
        self.timeout_s = timeout_s
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self._client = http.client(httpx.Timeout(timeout_s, connect=5.0))

    def run(self, request: ExecuteRequest, traceparent: str | None = None) -> ExecuteResponse:
        body, headers = _body(request)
        if traceparent:
            headers["traceparent"] = traceparent
        busy_for = request.limits.deadline_s or self.timeout_s
        return run_until_free(lambda: self._post(body, headers), busy_for, self.backoff_s)

    def _post(self, body: list[bytes], headers: dict[str, str]) -> ExecuteResponse:
        """One cell, through failed connections and 502/504s; refusals as execute raised them."""
        for failures in itertools.count(1):
            wait = min(self.max_backoff_s, self.backoff_s * 2**failures) * (0.5 + random.random())
            try:
                response = self._client.post(self.url, content=iter(body), headers=headers)
            except httpx.HTTPError as e:
                if failures > self.retries:
                    raise ExecuteError(f"execute plane unreachable at {self.url}: {e}") from None
                time.sleep(wait)
                continue
            status = response.status_code
            if status == 200:
                try:
                    return ExecuteResponse.model_validate_json(response.content)
                except ValidationError:
                    raise ExecuteError("execute plane sent an unreadable response") from None
            if status in (502, 504) and failures <= self.retries:
                time.sleep(max(wait, _seconds(response.headers.get("retry-after"))))
                continue
            raise _refusal(response)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._client.close()


def _body(request: ExecuteRequest) -> tuple[list[bytes], dict[str, str]]:
    """The request's body in pieces, and its headers: JSON, or with contexts' data, JSON and
    their canonical bytes after it (`EXECUTE_BYTES_TYPE`: no escaping, no parsing on the way)."""
    refs = [r for r in (request.rlm_context, *(request.rlm_contexts or ())) if r is not None]
    if all(ref.data is None for ref in refs):
        body = [request.model_dump_json(exclude_none=True).encode()]
        return body, {"content-type": "application/json", "content-length": str(len(body[0]))}
    without_data = {"rlm_context": {"data"}, "rlm_contexts": {"__all__": {"data"}}}
    header = request.model_dump(mode="json", exclude_none=True, exclude=without_data)
    places = [header.get("rlm_context"), *(header.get("rlm_contexts") or ())]
    parts = []
    for ref, place in zip(refs, [p for p in places if p is not None], strict=True):
        if ref.data is None:
            continue
        data = context_bytes(ref.data)
        place["data_bytes"] = len(data)
        place["data_kind"] = "text" if isinstance(ref.data, str) else "json"
        parts.append(data)
    body = framed(header, parts)
    size = str(sum(len(part) for part in body))
    return body, {"content-type": EXECUTE_BYTES_TYPE, "content-length": size}


class LocalExecutor:
    """The execute plane's cell runner in this process (embedded mode): same sandbox, no HTTP."""

    def __init__(self, runner: Any, busy_for_s: float = 900.0) -> None:
        self.runner = runner
        self.busy_for_s = busy_for_s

    def run(self, request: ExecuteRequest, traceparent: str | None = None) -> ExecuteResponse:
        busy_for = request.limits.deadline_s or self.busy_for_s
        return run_until_free(lambda: self.runner.run(request, traceparent), busy_for, 0.05)

    def close(self) -> None:
        self.runner.close()


@dataclass
class ReplSession:
    """One session on the execute plane; `run` hides 409s (re-send data, or replay)."""

    executor: Executor
    session_id: str
    context: Any
    limits: Limits
    mint_callback: Callable[[bool], Callback | None]  # replay: bool -> a callback for a cell
    state_ref: str | None = None
    state_data: str | None = None
    cells: list[str] = field(default_factory=list)  # the code of every cell, for replay
    contexts: list[Any] | None = None  # a conversation's contexts: context_0, context_1, ...
    context_refs: list[str] | None = None  # their refs, when the caller has them already
    base: StateRef | None = None  # the state the first cell starts from (a conversation's)
    cell_vars: dict[int, dict[str, Any]] = field(default_factory=dict)  # bound before cell i
    # The session's owner on the execute plane, sent with every cell: only cells that send it
    # reach the session and the state and contexts it sent.
    scope: str = field(default_factory=new_scope)

    def __post_init__(self) -> None:
        if self.contexts and not self.context_refs:
            self.context_refs = [context_ref(c) for c in self.contexts]
        # A conversation's newest context is `context`: hashed once, not again.
        self.context_ref = self.context_refs[-1] if self.contexts else context_ref(self.context)
        self._start_over()

    def run(
        self,
        code: str,
        traceparent: str | None = None,
        variables: dict[str, Any] | None = None,
        return_state: bool = False,
    ) -> ExecuteResponse:
        """One cell; `variables` are bound first; `return_state` asks for state.data back."""
        if variables:
            self.cell_vars[len(self.cells)] = variables
        callback = self.mint_callback(False)
        response = self._send(code, callback, traceparent, variables, return_state)
        self.cells.append(code)
        if not response.trapped:
            self._take_state(response)
        return response

    def _send(
        self,
        code: str,
        callback: Callback | None,
        traceparent: str | None,
        variables: dict[str, Any] | None = None,
        return_state: bool = False,
    ) -> ExecuteResponse:
        request = ExecuteRequest(
            code=code,
            context=variables or {},
            session_id=self.session_id,
            state=StateRef(ref=self.state_ref) if self.state_ref else None,
            rlm_context=CellContext(ref=self.context_ref),
            limits=self.limits,
            callback=callback,
            return_state=return_state,
            rlm_contexts=[CellContext(ref=r) for r in self.context_refs] if self.contexts else None,
            scope=self.scope,
        )
        for _ in range(3):
            try:
                return self.executor.run(request, traceparent)
            except MissingRefs as e:
                if "rlm_context" in e.missing:
                    request.rlm_context = CellContext(ref=self.context_ref, data=self.context)
                if "rlm_contexts" in e.missing and self.contexts:
                    request.rlm_contexts = [
                        CellContext(ref=r, data=c)
                        for r, c in zip(self.context_refs, self.contexts, strict=True)
                    ]
                if "state" in e.missing:
                    if self.state_data is not None:
                        request.state = StateRef(ref=self.state_ref or "", data=self.state_data)
                    else:
                        self._replay(traceparent)
                        request.state = StateRef(ref=self.state_ref) if self.state_ref else None
        raise ExecuteError("the execute plane kept losing this session's state")

    def _replay(self, traceparent: str | None) -> None:
        """Rebuild the session from its first cell: sub-calls are answered from the memo."""
        if self.base is not None and self.base.data is None:
            raise ExecuteError("the execute plane lost this conversation's state")
        self._start_over()
        callback = self.mint_callback(True)
        for i, code in enumerate(self.cells):
            response = self._send(code, callback, traceparent, self.cell_vars.get(i))
            if not response.trapped:
                self._take_state(response)

    def _start_over(self) -> None:
        self.state_ref = self.base.ref if self.base else None
        self.state_data = self.base.data if self.base else None

    def _take_state(self, response: ExecuteResponse) -> None:
        if response.state is not None:
            self.state_ref = response.state.ref
            self.state_data = response.state.data


def _refusal(response: httpx.Response) -> RLMError:
    """Execute's answer other than 200, as the error execute raised for it."""
    text = _error_text(response)
    if response.status_code == 409:
        try:
            missing = Missing.model_validate_json(response.content).missing
        except ValidationError:
            raise ExecuteError(f"execute plane sent an unreadable 409: {text}") from None
        return MissingRefs(list(missing))
    if response.status_code == 422:
        return BadCell(text)
    if response.status_code in (429, 503):
        return Saturated(text, retry_after_s=round(_seconds(response.headers.get("retry-after"))))
    return ExecuteError(f"execute plane refused the cell ({response.status_code}): {text}")


def _seconds(header: str | None) -> float:
    """A Retry-After value in seconds (at most 30), 0 when absent or unreadable."""
    try:
        return max(0.0, min(30.0, float(header or 0)))
    except ValueError:
        return 0.0


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))[:500]
    except ValueError:
        return response.text[:500]

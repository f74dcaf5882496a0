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
    Callback,
    ContextRef,
    ExecuteRequest,
    ExecuteResponse,
    Limits,
    StateRef,
    context_ref,
)


class ExecuteMissing(Exception):
    def __init__(self, missing: list[str]) -> None:
        super().__init__(", ".join(missing))
        self.missing = missing


class ExecuteError(Exception):
    """The execute plane could not run the cell (after retries), or refused it."""


class Executor(Protocol):
    def run(self, request: ExecuteRequest, traceparent: str | None = None) -> ExecuteResponse: ...


class RemoteExecutor:
    """POSTs cells to an execute function; retries what is safe to retry.

    A cell re-sent with the same state ref is safe: the pod either still holds the session at
    that ref or rebuilds it from the ref, so the cell runs on the same variables. A saturated
    pod (429/503) is asked again after its Retry-After for as long as the cell's own deadline
    (saturation is normal under load, not a failure); other failures `retries` times.
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
        body = request.model_dump_json(exclude_none=True).encode()
        headers = {"content-type": "application/json"}
        if traceparent:
            headers["traceparent"] = traceparent
        busy_until = time.monotonic() + (request.limits.deadline_s or self.timeout_s)
        failures = 0
        for attempt in itertools.count():
            wait = min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random())
            try:
                response = self._client.post(self.url, content=body, headers=headers)
            except httpx.HTTPError as e:
                failures += 1
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
            if status == 409:
                raise ExecuteMissing(response.json().get("missing", []))
            wait = max(wait, _retry_after(response))
            if status in (429, 503) and time.monotonic() + wait < busy_until:
                time.sleep(wait)
                continue
            failures += status in (502, 504)
            if status in (502, 504) and failures <= self.retries:
                time.sleep(wait)
                continue
            raise ExecuteError(f"execute plane refused the cell ({status}): "
                               f"{_error_text(response)}")  # fmt: skip
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._client.close()


class LocalExecutor:
    """The execute plane's cell runner in this process (embedded mode): same sandbox, no HTTP."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner

    def run(self, request: ExecuteRequest, traceparent: str | None = None) -> ExecuteResponse:
        from functions.execute.cells import BadCell, MissingRefs, Saturated

        for _ in range(100):
            try:
                return self.runner.run(request, traceparent)
            except MissingRefs as e:
                raise ExecuteMissing(e.missing) from None
            except BadCell as e:
                raise ExecuteError(str(e)) from None
            except Saturated:
                time.sleep(0.1)
        raise ExecuteError("the embedded sandbox stayed busy")

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
            rlm_context=ContextRef(ref=self.context_ref),
            limits=self.limits,
            callback=callback,
            return_state=return_state,
            rlm_contexts=[ContextRef(ref=r) for r in self.context_refs] if self.contexts else None,
        )
        for _ in range(3):
            try:
                return self.executor.run(request, traceparent)
            except ExecuteMissing as e:
                if "rlm_context" in e.missing:
                    request.rlm_context = ContextRef(ref=self.context_ref, data=self.context)
                if "rlm_contexts" in e.missing and self.contexts:
                    request.rlm_contexts = [
                        ContextRef(ref=r, data=c)
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


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(30.0, float(response.headers.get("retry-after", "0")))
    except ValueError:
        return 0.0


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))[:500]
    except ValueError:
        return response.text[:500]

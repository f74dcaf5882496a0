"""The host side of the guest's sub-calls: counted, capped, and sent to the cell's callback."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import ValidationError

from functions import http
from functions.contract import (
    SUBCALL_BYTES_TYPE,
    Callback,
    PromptBatch,
    SubcallRequest,
    SubcallResponse,
    SubcallSummary,
    framed,
    merge_usage,
)
from functions.execute.sandbox import SubcallRefused
from functions.urls import Allowlist, UrlRefused

# Delivers one sub-call request for a cell (a large batch's prompts as bytes beside it): over
# HTTP to infer, or in-process when embedded.
Transport = Callable[
    [Callback, SubcallRequest, dict[str, str], "PromptBatch | None"], SubcallResponse
]


@dataclass
class CellScope:
    """What one cell may do with sub-calls, and what it did."""

    callback: Callback | None = None
    max_subcalls: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    summary: SubcallSummary = field(default_factory=SubcallSummary)
    # While the guest waits on a sub-call it uses no CPU: its slot is lent out meanwhile, so
    # cells of child RLMs can run (otherwise deep recursion would deadlock on slots).
    pause: Callable[[], None] = lambda: None
    resume: Callable[[], None] = lambda: None
    lock: threading.Lock = field(default_factory=threading.Lock)
    cancel: threading.Event = field(default_factory=threading.Event)  # set: the run was cancelled


class SubcallGate:
    """Bound to one interpreter; the scope is swapped in for each cell it runs."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.scope = CellScope()

    def __call__(self, kind: str, prompts: list[str], model: str | None) -> list[str]:
        tools = self._callback().sub_tools if kind == "rlm" else {}
        reply = self._send(len(prompts), kind=kind, prompts=prompts, model=model, tools=tools)
        if len(reply.responses) != len(prompts):
            raise SubcallRefused("the sub-call answer did not match the prompts")
        return reply.responses

    def batch(
        self, kind: str, data: bytes | None, lengths: list[int], model: str | None
    ) -> list[str]:
        """A large batch the guest wrote to the mount as UTF-8, `lengths` its prompts' bytes:
        handed on as it is (the infer plane decodes it)."""
        if data is None:
            raise SubcallRefused("the sub-call batch was not written")
        batch = PromptBatch(data, lengths)
        if problem := batch.problem():
            raise SubcallRefused(f"the sub-call batch is malformed: {problem}")
        tools = self._callback().sub_tools if kind == "rlm" else {}
        reply = self._send(len(lengths), batch, kind=kind, prompt_bytes=lengths, model=model,
                           tools=tools)  # fmt: skip
        if len(reply.responses) != len(lengths):
            raise SubcallRefused("the sub-call answer did not match the prompts")
        return reply.responses

    def tool(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """One call of a caller's tool; counted as one sub-call."""
        spec = self._callback().tools.get(name)
        if spec is None:
            raise SubcallRefused(f"no tool named {name!r} in this cell")
        arguments = {"args": args, "kwargs": kwargs}
        reply = self._send(1, None, kind="tool", tool=name, arguments=arguments, tools={name: spec})
        return reply.result

    def _callback(self) -> Callback:
        if self.scope.callback is None:
            raise SubcallRefused(
                "sub-calls are not available in this cell: the request had no callback"
            )
        return self.scope.callback

    def _send(self, count: int, batch: PromptBatch | None = None, **fields: Any) -> SubcallResponse:
        scope = self.scope
        callback = self._callback()
        if scope.cancel.is_set():
            raise SubcallRefused("the run was cancelled")
        with scope.lock:
            if scope.summary.count + count > scope.max_subcalls:
                raise SubcallRefused(
                    f"sub-call limit reached: at most {scope.max_subcalls} per cell "
                    f"({scope.summary.count} made, {count} more asked)"
                )
            scope.summary.count += count
        try:
            request = SubcallRequest(**fields)
        except ValidationError as e:
            raise SubcallRefused(f"bad sub-call: {e.errors()[0]['msg']}") from None
        scope.pause()
        try:
            reply = self.transport(callback, request, scope.headers, batch)
        finally:
            scope.resume()
        with scope.lock:
            merge_usage(scope.summary.usage, reply.usage)
        if reply.cancelled:
            scope.cancel.set()  # the turn stops as soon as the guest runs again
        if reply.error is not None:
            raise SubcallRefused(reply.error)
        return reply


# What the guest is told when infer refuses a callback: infer's own words are not passed on,
# so a callback.url that reached some other server could not read that server's answers out.
REFUSALS = {
    401: "the cell's sub-call token was refused (expired, or not infer's)",
    403: "the sub-call is outside what this run may do (its models, depth or tools)",
    404: "the callback URL is not infer's sub-call endpoint",
    413: "the sub-call request was too large",
    422: "the sub-call request was malformed",
    429: "the infer plane is busy",
    503: "the infer plane is unavailable",
}


class HttpTransport:
    """POSTs to the callback URL, only one under EXECUTE_CALLBACK_ORIGINS and at the address
    checked there, with the cell's bearer token; errors become guest exceptions."""

    def __init__(self, timeout_s: float, origins: tuple[str, ...] = ()) -> None:
        self._client = http.client(httpx.Timeout(timeout_s, connect=10.0))
        self.allowed = Allowlist.of("EXECUTE_CALLBACK_ORIGINS", origins)

    def __call__(
        self,
        callback: Callback,
        request: SubcallRequest,
        headers: dict[str, str],
        batch: PromptBatch | None = None,
    ) -> SubcallResponse:
        if not self.allowed:
            raise SubcallRefused("sub-call not sent: EXECUTE_CALLBACK_ORIGINS names no infer")
        try:
            target = self.allowed.target(callback.url, "callback.url")
        except UrlRefused as e:
            raise SubcallRefused(f"sub-call not sent: {e.message}") from None
        headers = {"Authorization": f"Bearer {callback.token}", **headers, **target.headers}
        body: dict[str, Any] = {"json": request.model_dump()}
        if batch is not None:  # the prompts as the guest wrote them, after a JSON header
            parts = framed(request.model_dump(exclude={"prompts"}), [batch.data])
            headers["Content-Type"] = SUBCALL_BYTES_TYPE
            headers["Content-Length"] = str(sum(len(part) for part in parts))
            body = {"content": iter(parts)}
        try:
            response = self._client.post(
                target.connect_url,
                headers=headers,
                extensions=target.extensions,
                follow_redirects=False,
                **body,
            )
        except httpx.TimeoutException:
            raise SubcallRefused("sub-call timed out waiting for the infer plane") from None
        except httpx.HTTPError as e:
            raise SubcallRefused(f"sub-call could not reach the infer plane: {e}") from None
        if response.status_code != 200:
            reason = REFUSALS.get(response.status_code, "the callback answered with an error")
            raise SubcallRefused(f"sub-call refused (HTTP {response.status_code}): {reason}")
        try:
            return SubcallResponse.model_validate_json(response.content)
        except ValidationError:
            raise SubcallRefused("the infer plane sent an unreadable sub-call answer") from None

    def close(self) -> None:
        self._client.close()

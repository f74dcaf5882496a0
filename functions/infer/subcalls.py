"""The sub-call endpoint: the sandbox's `llm_query`, `rlm_query` and tool calls reach infer here.

One implementation, three doors: the `/subcalls` route of the infer function, the SDK's callback
server (its remote mode), and the in-process transport of the embedded sandbox. Each authorizes
the bearer token, bounds the body, dispatches to the service and maps failures the same way, so
the guest reads the same message whichever way its call came.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from functions.contract import (
    SUBCALL_BYTES_TYPE,
    Callback,
    PromptBatch,
    SubcallRequest,
    SubcallResponse,
    media_type,
    unframed,
)
from functions.errors import (
    BadRequest,
    Forbidden,
    PayloadTooLarge,
    RLMError,
    Unauthorized,
    UpstreamError,
)
from functions.http import parse_json, validate

if TYPE_CHECKING:
    from functions.infer.service import InferService

MAX_BODY_BYTES = 64 << 20  # a batch's prompts; a cell's whole output is far smaller


def bearer(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer …` header; `Unauthorized` without one."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    return token.strip()


def parse(body: bytes, content_type: str | None = None) -> SubcallRequest:
    """The request in `body` (read with at most `MAX_BODY_BYTES + 1` bytes): JSON, or a large
    batch's prompts as bytes after a JSON header (`SUBCALL_BYTES_TYPE`)."""
    if len(body) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"sub-call body is over the limit of {MAX_BODY_BYTES} bytes")
    if media_type(content_type) != SUBCALL_BYTES_TYPE:
        request = validate(SubcallRequest, parse_json(body))
        if request.prompt_bytes is not None:
            raise BadRequest(f"prompt_bytes comes only with a {SUBCALL_BYTES_TYPE} body")
        return request
    try:
        head, data = unframed(body, SUBCALL_BYTES_TYPE)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    header = validate(SubcallRequest, parse_json(head))
    if header.prompts:
        raise BadRequest(f"a {SUBCALL_BYTES_TYPE} body sends prompt_bytes, not prompts")
    return with_prompts(header, PromptBatch(data, header.prompt_bytes or []), BadRequest)


def with_prompts(
    request: SubcallRequest, batch: PromptBatch, error: Callable[[str], Exception]
) -> SubcallRequest:
    """`request` with the batch's prompts decoded in; `error(message)` raised for a bad one."""
    problem = batch.problem()
    if problem is None:
        try:
            prompts = batch.prompts()
        except ValueError as e:
            problem = str(e)
    if problem is not None:
        raise error(f"bad sub-call batch: {problem}")
    return request.model_copy(update={"prompts": prompts, "prompt_bytes": None})


def dispatch(service: InferService, token: str, request: SubcallRequest) -> SubcallResponse:
    """Serve one sub-call. What the run may not do (`Forbidden`: out of the token's scope, over
    the cell's prompts or the run's children, past its budget) and a sub-model that failed are
    answers with `error` set, which the guest raises as they are: the execute plane never passes
    on an error response's body. Any other failure is an `RLMError` (an HTTP error)."""
    from functions.infer import metrics
    from functions.infer.llm import LLMError

    try:
        reply = service.subcall(token, request)
    except Forbidden as e:
        return refusal(e)
    except LLMError as e:
        return refusal(UpstreamError(f"the sub-model failed: {e}"))
    metrics.subcalls_total.labels(kind=request.kind).inc(len(request.prompts))
    return reply


def refusal(error: RLMError) -> SubcallResponse:
    return SubcallResponse(
        responses=[], error=f"sub-call refused ({error.status}): {error.message}"
    )


def serve(
    service: InferService,
    authorization: str | None,
    read: Callable[[int], bytes],
    content_type: str | None = None,
) -> SubcallResponse:
    """The whole endpoint: `read(n)` gives at most n bytes of the body."""
    token = bearer(authorization)
    return dispatch(service, token, parse(read(MAX_BODY_BYTES + 1), content_type))


class InProcess:
    """The embedded sandbox's transport: straight into the service, no HTTP."""

    service: InferService  # set once the service that owns this transport is built

    def __call__(
        self,
        callback: Callback,
        request: SubcallRequest,
        headers: dict[str, str],
        batch: PromptBatch | None = None,
    ) -> SubcallResponse:
        from functions.execute.sandbox import SubcallRefused

        if batch is not None:
            request = with_prompts(request, batch, SubcallRefused)
        try:
            return dispatch(self.service, callback.token, request)
        except RLMError as e:
            raise SubcallRefused(f"sub-call refused ({e.status}): {e.message}") from None


def callback_server(service: InferService, host: str, port: int) -> ThreadingHTTPServer:
    """A small HTTP server of this endpoint, for a remote execute plane to call back into an
    SDK process (any path answers: the callback URL is this server's)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("content-length") or 0)
            except ValueError:
                length = 0
            status, reply = 200, b""
            try:
                if length > MAX_BODY_BYTES:
                    raise PayloadTooLarge(
                        f"sub-call body is {length} bytes; the limit is {MAX_BODY_BYTES}"
                    )
                read = lambda n: self.rfile.read(min(n, length))  # noqa: E731
                answer = serve(service, self.headers.get("authorization"), read,
                               self.headers.get("content-type"))  # fmt: skip
                reply = answer.model_dump_json().encode()
            except RLMError as e:
                status, reply = e.status, json.dumps(e.problem()).encode()
                self.close_connection = True  # an unread body must not be parsed as a request
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server

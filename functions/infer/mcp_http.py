"""`/mcp` on the infer function: the MCP SDK's streamable-HTTP app, served from the WSGI process.

The SDK's server is ASGI; the infer function is Flask under gunicorn's threads. The app runs
on one event loop in a thread of its own, its lifespan (the SDK's session manager) entered once,
and a2wsgi hands it each /mcp request from the gunicorn thread serving that request. The
gunicorn thread waits on the response as it would on /infer's, so a run over MCP holds one of
gunicorn's threads like any other run, and the run bound's thread arithmetic
(`InferSettings.run_bound`) holds as it is; the run itself goes on a worker thread of the
loop's, its sub-call callbacks come back through gunicorn as always.

Stateless: any infer pod answers any request, as Knative routes them. A client on protocol
2026-07-28 (the SDK's own) sends self-contained requests and cancels a call by closing its
stream; an older client's initialize and tools/call stand alone as well. A client that closes
its stream is found by looking at its connection (a2wsgi does not tell the app), and its run
stops.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mcp.server.mcpserver import Context, MCPServer

# Keys this function adds to the WSGI environ of an /mcp request, for the tool calls it makes.
CALLER = "rlm.caller"  # the authenticated caller (callers.Caller): the owner of the runs
HUNG_UP = "rlm.hung_up"  # () -> bool: the client closed its connection


class McpApp:
    """The MCP server's streamable-HTTP app as a WSGI application."""

    def __init__(self, server: MCPServer, max_body_bytes: int, path: str = "/mcp") -> None:
        from a2wsgi import ASGIMiddleware

        app = server.streamable_http_app(
            streamable_http_path=path,
            stateless_http=True,
            max_request_body_size=max_body_bytes,
            host="0.0.0.0",  # callers are checked by infer's own authentication, not by Host
        )
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="mcp-loop").start()
        started = threading.Event()

        async def live() -> None:
            async with app.router.lifespan_context(app):
                started.set()
                await asyncio.Event().wait()  # as long as the process

        self._lifespan = asyncio.run_coroutine_threadsafe(live(), self.loop)
        if not started.wait(30):
            raise RuntimeError(f"the MCP app did not start: {self._lifespan}")
        self.wsgi = ASGIMiddleware(app, loop=self.loop)

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        return self.wsgi(environ, start_response)


def who(ctx: Context) -> tuple[Any, Callable[[], bool]]:
    """The caller of a tool call made over /mcp, and whether its client has hung up."""
    request = ctx.request_context.request
    environ = getattr(request, "scope", {}).get("wsgi_environ") or {}
    return environ[CALLER], environ.get(HUNG_UP, lambda: False)

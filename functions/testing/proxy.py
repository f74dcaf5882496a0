"""A round-robin HTTP proxy on loopback: one address in front of several infer processes, as a
Knative route is in front of several pods. Each request goes to the next backend in turn; one
that refuses the connection (a killed pod, which a route stops sending to) is passed over for
the next, since nothing reached it."""

from __future__ import annotations

import itertools
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host",
               "proxy-connection", "content-length"}  # fmt: skip


class RoundRobin:
    def __init__(self, backends: list[str], host: str = "127.0.0.1") -> None:
        self.backends = backends
        self._next = itertools.cycle(range(len(backends)))
        self._lock = threading.Lock()
        self.served: list[tuple[int, str]] = []  # (backend, path) of each request, in order
        self.seen: list[tuple[str, dict[str, str], bytes]] = []  # (path, headers, body)
        self._client = httpx.Client(timeout=httpx.Timeout(600, connect=5))
        self._server = ThreadingHTTPServer((host, 0), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def pick(self, path: str, headers: dict[str, str], body: bytes) -> int:
        with self._lock:
            index = next(self._next)
            self.served.append((index, path))
            self.seen.append((path, headers, body))
            return index

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()


def _handler(proxy: RoundRobin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            for _ in range(len(proxy.backends)):
                target = proxy.backends[proxy.pick(self.path, headers, body)] + self.path
                try:
                    self._relay(target, headers, body)
                    return
                except httpx.ConnectError as e:
                    refused = e
                except httpx.HTTPError as e:
                    self._unreachable(target, e)
                    return
            self._unreachable(target, refused)

        def _relay(self, target: str, headers: dict[str, str], body: bytes) -> None:
            with proxy._client.stream(self.command, target, headers=headers, content=body) as reply:
                self.send_response(reply.status_code)
                for k, v in reply.headers.items():
                    if k.lower() not in _HOP_BY_HOP:
                        self.send_header(k, v)
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for chunk in reply.iter_raw():
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

        def _unreachable(self, target: str, error: Exception) -> None:
            message = f"proxy: {target} unreachable: {error}".encode()
            self.send_response(502)
            self.send_header("content-length", str(len(message)))
            self.end_headers()
            self.wfile.write(message)

        do_GET = do_POST = _forward

    return Handler

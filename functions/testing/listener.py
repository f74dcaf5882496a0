"""A loopback HTTP server that records every request it gets: to show what a URL check let
through (and that what it refused reached nothing), and to stand for the servers a URL names."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Heard:
    method: str
    path: str  # as sent on the request line
    headers: dict[str, str]  # names lowercased
    body: bytes


@dataclass
class Listener:
    """`routes`: path -> (status, headers, body); any other path answers 404. Start it with
    `with Listener(...) as listener:`; `url` is its origin, `heard` what it received."""

    routes: dict[str, tuple[int, dict[str, str], bytes]] = field(default_factory=dict)
    heard: list[Heard] = field(default_factory=list)
    port: int = 0

    def __enter__(self) -> Listener:
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                listener.heard.append(Heard(self.command, self.path, headers, body))
                status, headers, reply = listener.routes.get(self.path, (404, {}, b"no"))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            do_GET = do_POST = do_PUT = _answer

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        return [h.path for h in self.heard]

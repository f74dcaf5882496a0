"""How both functions are served: gunicorn's threaded worker, with each request's line, headers
and small body gathered by the worker's poller before a thread takes it.

functions-framework serves a function under gunicorn's gthread worker with no limit on the
request line, and a thread reads each request as slowly as its client sends it: a dozen clients
dripping a byte a second hold a dozen threads, and /health waits behind them. `EdgeWorker`
reads a request's head and up to `EdgeLimits.prebuffer_bytes` of its body in the poller, which
no slow client can hold; answers a request line or head over its limits with 414/431 (a JSON
problem that echoes none of it); and drops a request that has not arrived within its read
timeout with 408. A body larger than the prebuffer is read by the thread under the same deadline,
so a client can hold a thread only for that long, and only after sending that much.

A plane calls `serve_hardened` at import, inside functions-framework, before it builds its server.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
import selectors
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from gunicorn.http import errors as http_errors
from gunicorn.http.unreader import Unreader
from gunicorn.workers.gthread import TConn, ThreadWorker

from functions.errors import RLMError

log = logging.getLogger("rlm.server")

MAX_REQUEST_LINE = 8190  # gunicorn's own ceiling for limit_request_line
MAX_HEADER_FIELDS = 100
# After a refusal from the poller, what the client still sends is read and dropped for this
# long (at most LINGER_BYTES), so its kernel does not reset the connection before it reads why.
LINGER_S, LINGER_BYTES = 2.0, 64 << 20


@dataclass(frozen=True)
class EdgeLimits:
    """What a request may take to arrive, and how large its head may be."""

    read_timeout_s: float = 60.0  # line, headers and body, from the first moment it could come
    max_header_bytes: int = 64 << 10  # the request line and headers together
    max_body_bytes: int = 256 << 20  # a larger announced body goes to a thread at once, for 413
    prebuffer_bytes: int = 1 << 20  # body bytes read before a thread takes the request


LIMITS = EdgeLimits()


class ReadTimeout(RLMError, TimeoutError):
    """The request did not arrive within the read timeout (408); the connection closes."""

    status = 408


def serve_hardened(limits: EdgeLimits) -> None:
    """Have functions-framework's gunicorn run `EdgeWorker` under `limits`, with gunicorn's own
    limits on the request line and headers set, not lifted."""
    global LIMITS
    LIMITS = limits
    from functions_framework._http import gunicorn as framework

    application = framework.GunicornApplication
    if getattr(application.load_config, "hardened", False):
        return
    load_config = application.load_config

    def hardened(self: Any) -> None:
        load_config(self)
        self.cfg.set("worker_class", EdgeWorker)
        self.cfg.set("limit_request_line", MAX_REQUEST_LINE)
        self.cfg.set("limit_request_fields", MAX_HEADER_FIELDS)
        self.cfg.set("limit_request_field_size", LIMITS.max_header_bytes)

    hardened.hardened = True  # type: ignore[attr-defined]
    application.load_config = hardened


class DeadlineUnreader(Unreader):
    """gunicorn's socket reader, bounded by the connection's request deadline: each read waits
    at most for what is left of it. Writes wait at most the read timeout."""

    def __init__(self, conn: EdgeConn) -> None:
        super().__init__()
        self.conn = conn

    def chunk(self, size_hint: int | None = None) -> bytes:
        sock = self.conn.sock
        left = self.conn.deadline - time.monotonic()
        if left <= 0:
            raise ReadTimeout(_too_slow(), headers={"Connection": "close"})
        sock.settimeout(left)
        try:
            return sock.recv(min(max(size_hint or 0, 8192), 1 << 20))
        except TimeoutError:
            raise ReadTimeout(_too_slow(), headers={"Connection": "close"}) from None
        finally:
            sock.settimeout(LIMITS.read_timeout_s)


class EdgeConn(TConn):
    """A connection whose next request is gathered by the poller before a thread takes it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.ahead = bytearray()  # what the poller read of the request
        self.deadline = 0.0  # when the request must have arrived
        self.ready = False  # gathered: the next enqueue goes to a thread
        self.continued = False  # "100 Continue" sent for this request
        self.drained = 0  # bytes dropped after a refusal

    def init(self) -> None:
        super().init()
        unreader = self.parser.unreader
        if not isinstance(unreader, DeadlineUnreader):
            bounded = DeadlineUnreader(self)
            bounded.buf = unreader.buf
            self.parser.unreader = bounded
        self.sock.settimeout(LIMITS.read_timeout_s)
        if self.ahead:
            self.parser.unreader.unread(bytes(self.ahead))
            self.ahead = bytearray()


class EdgeWorker(ThreadWorker):
    """gthread whose threads only ever see requests that have arrived (or that are larger than
    the prebuffer), and whose errors for malformed requests are JSON problems."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gathering: deque[EdgeConn] = deque()  # in deadline order: one timeout for all
        self.lingering: deque[EdgeConn] = deque()  # refused, their input drained a while

    def accept(self, listener: Any) -> None:
        try:
            sock, client = listener.accept()
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED):
                raise
            return
        self.nr_conns += 1
        self.enqueue_req(EdgeConn(self.cfg, sock, client, listener.getsockname()))

    def enqueue_req(self, conn: Any) -> None:
        """Every path to a thread comes here: a new connection, a kept-alive one with a next
        request, one with a pipelined request left over. Only a gathered request goes on."""
        if not isinstance(conn, EdgeConn) or conn.ready:
            if isinstance(conn, EdgeConn):
                conn.ready = False
            super().enqueue_req(conn)
            return
        if conn.parser is not None:
            conn.ahead += conn.parser.unreader.take_buffered()
        conn.sock.setblocking(False)
        conn.deadline = time.monotonic() + LIMITS.read_timeout_s
        conn.continued = False
        # What has come is read now (a kept-alive connection is here because it is readable):
        # a request that is all in goes to a thread without another turn of the poller.
        if self._examine(conn) or self._read(conn) is not True:
            return
        self.gathering.append(conn)
        self.poller.register(
            conn.sock, selectors.EVENT_READ, lambda _sock, c=conn: self._on_readable(c)
        )

    def _on_readable(self, conn: EdgeConn) -> None:
        if self._read(conn) is None:
            self._drop(conn)

    def _read(self, conn: EdgeConn) -> bool | None:
        """Read what the socket holds and examine it: True when the request needs more, False
        when it was dispatched or refused, None when the client hung up."""
        try:
            data = conn.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data:
            if conn not in self.gathering:
                self._close(conn)
            return None
        conn.ahead += data
        return not self._examine(conn)

    def _examine(self, conn: EdgeConn) -> bool:
        """Dispatch or refuse a request that is in (True), or say it needs more (False)."""
        verdict = _gathered(conn, LIMITS)
        if verdict is None:
            return False
        if verdict == "continue":
            conn.continued = True
            _send(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
            return self._examine(conn)
        if verdict == "ready":
            conn.ready = conn.data_ready = True
            if conn in self.gathering:
                self._ungather(conn)
            self.enqueue_req(conn)
            return True
        status, reason, message = verdict
        if conn in self.gathering:
            self._ungather(conn)
        self._refuse(conn, _problem(status, reason, message))
        return True

    def _refuse(self, conn: EdgeConn, answer: bytes) -> None:
        """Answer from the poller, then drain what the client still sends before closing."""
        _send(conn, answer)
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.deadline, conn.ahead, conn.drained = time.monotonic() + LINGER_S, bytearray(), 0
        self.lingering.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, lambda _sock, c=conn: self._drain(c))

    def _drain(self, conn: EdgeConn) -> None:
        try:
            data = conn.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.drained += len(data)
        if not data or conn.drained > LINGER_BYTES:
            self._unlinger(conn)

    def _unlinger(self, conn: EdgeConn) -> None:
        self._forget(conn, self.lingering)
        self._close(conn)

    def _ungather(self, conn: EdgeConn) -> None:
        self._forget(conn, self.gathering)

    def _forget(self, conn: EdgeConn, waiting: deque[EdgeConn]) -> None:
        """The poller stops watching `conn`, and it leaves `waiting`."""
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(conn.sock)
        with contextlib.suppress(ValueError):
            waiting.remove(conn)

    def _drop(self, conn: EdgeConn) -> None:
        self._ungather(conn)
        self._close(conn)

    def _close(self, conn: EdgeConn) -> None:
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        while self.lingering and self.lingering[0].deadline <= now:
            self._unlinger(self.lingering[0])
        while self.gathering and self.gathering[0].deadline <= now:
            conn = self.gathering[0]
            self._ungather(conn)
            if conn.ahead:  # a request that began and did not finish: say why
                self._refuse(conn, _problem(408, "Request Timeout", _too_slow()))
            else:
                self._close(conn)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """A request gunicorn could not parse: a JSON problem that quotes nothing of it."""
        refusal = _parse_refusal(exc)
        if refusal is None:
            super().handle_error(req, client, addr, exc)
            return
        log.warning("refused a request: %s", refusal[2])
        with contextlib.suppress(OSError):
            client.sendall(_problem(*refusal))


# ----------------------------------------------------------------------------- the head


_LENGTH = re.compile(rb"^content-length:[ \t]*([0-9]{1,19})[ \t]*$", re.I | re.M)
_CHUNKED = re.compile(rb"^transfer-encoding:.*chunked", re.I | re.M)
_EXPECT = re.compile(rb"^expect:[ \t]*100-continue[ \t]*$", re.I | re.M)


def _gathered(conn: EdgeConn, limits: EdgeLimits) -> Any:
    """ "ready", "continue", None (more is needed) or a refusal (status, reason, message)."""
    ahead = conn.ahead
    line_end = ahead.find(b"\r\n", 0, MAX_REQUEST_LINE + 2)
    if line_end < 0 and len(ahead) > MAX_REQUEST_LINE:
        return 414, "URI Too Long", f"the request line is over {MAX_REQUEST_LINE} bytes"
    head_end = ahead.find(b"\r\n\r\n", 0, limits.max_header_bytes + 4)
    if head_end < 0:
        if len(ahead) > limits.max_header_bytes:
            return 431, "Request Header Fields Too Large", _head_too_large(limits)
        return None
    head = bytes(ahead[:head_end])
    if head.count(b"\r\n") > MAX_HEADER_FIELDS:
        return 431, "Request Header Fields Too Large", _head_too_large(limits)
    body = len(ahead) - head_end - 4
    if _EXPECT.search(head) and not conn.continued and body == 0:
        return "continue"
    if _CHUNKED.search(head):
        done = _chunked_end(ahead, head_end + 4)
        return "ready" if done is not False or body >= limits.prebuffer_bytes else None
    length = _LENGTH.search(head)
    wanted = int(length.group(1)) if length else 0
    if wanted > limits.max_body_bytes:
        return "ready"  # the function refuses it (413) without reading it
    return "ready" if body >= min(wanted, limits.prebuffer_bytes) else None


_CHUNK_SIZE = re.compile(rb"([0-9a-fA-F]{1,16})[ \t]*(?:;[^\r\n]*)?\r\n")


def _chunked_end(data: bytearray, at: int) -> bool | None:
    """Whether a chunked body starting at `at` is all in (its last chunk and trailers); None
    when it is malformed (the thread's parser then says how)."""
    while True:
        size = _CHUNK_SIZE.match(data, at)
        if size is None:
            return False if data.find(b"\r\n", at) < 0 else None
        at = size.end()
        length = int(size.group(1), 16)
        if length == 0:
            while True:  # trailer fields, then an empty line
                end = data.find(b"\r\n", at)
                if end < 0:
                    return False
                if end == at:
                    return True
                at = end + 2
        at += length + 2
        if at > len(data):
            return False


def _head_too_large(limits: EdgeLimits) -> str:
    return (
        f"the request line and headers are over {limits.max_header_bytes} bytes, or over "
        f"{MAX_HEADER_FIELDS} header fields: send fewer or smaller headers"
    )


def _too_slow() -> str:
    return f"the request did not arrive within {LIMITS.read_timeout_s:g} s"


def _parse_refusal(exc: BaseException) -> tuple[int, str, str] | None:
    if isinstance(exc, http_errors.LimitRequestLine):
        return 414, "URI Too Long", f"the request line is over {MAX_REQUEST_LINE} bytes"
    if isinstance(exc, http_errors.LimitRequestHeaders):
        return 431, "Request Header Fields Too Large", _head_too_large(LIMITS)
    if isinstance(exc, http_errors.UnsupportedTransferCoding):
        return 501, "Not Implemented", "that transfer coding is not supported: send chunked or none"
    malformed = {
        http_errors.InvalidRequestLine: "the request line is not METHOD PATH HTTP/1.x",
        http_errors.InvalidRequestMethod: "the request method is not a valid token",
        http_errors.InvalidHTTPVersion: "the HTTP version is not 1.0 or 1.1",
        http_errors.InvalidHeader: "a header is malformed",
        http_errors.InvalidHeaderName: "a header name is malformed",
        http_errors.InvalidChunkSize: "the chunked body is malformed",
        http_errors.ChunkMissingTerminator: "the chunked body is malformed",
        http_errors.ObsoleteFolding: "a header is folded over lines, which HTTP/1.1 forbids",
    }
    for kind, message in malformed.items():
        if isinstance(exc, kind):
            return 400, "Bad Request", message
    return None


def _problem(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": f"{reason}: {message}"}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def _send(conn: EdgeConn, data: bytes) -> None:
    """A short answer from the poller: what the socket takes now; the rest is dropped."""
    with contextlib.suppress(OSError):
        conn.sock.send(data)

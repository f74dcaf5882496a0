"""Hostile HTTP input against both functions as real processes: every answer is a clear 4xx
that says what to fix, and the process goes on serving. (test_execute_http.py holds the
execute plane's ordinary bad requests; these add what it lacks, for both planes.)"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest
from cloudevents.conversion import to_structured
from cloudevents.http import CloudEvent

from functions import events
from tests.conftest import Served, free_port, infer_env, serve


@dataclass
class Plane:
    served: Served
    event_type: str
    body: dict  # a valid request


@pytest.fixture(params=["execute", "infer"])
def plane(request, execute_server, stack) -> Plane:
    if request.param == "execute":
        return Plane(execute_server, events.EXECUTE_REQUESTED, {"code": "print(1)"})
    return Plane(stack.infer, events.INFER_REQUESTED, {"query": "q", "context": "c"})


@pytest.fixture(scope="module")
def small_infer(tmp_path_factory, scripted_llm, stack) -> Iterator[Served]:
    """An infer whose request limit is 2 MiB (1 MiB of context and 1 MiB of slack)."""
    port = free_port()
    env = infer_env(scripted_llm, stack.execute.url, port, INFER_MAX_CONTEXT_MB="1")
    served = serve("infer", env, tmp_path_factory.mktemp("small-infer"), port=port)
    yield served
    served.stop()


def post(served: Served, content: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(served.url + "/", content=content, headers=headers, timeout=60)


def problem(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    for word in words:
        assert word in message, message


def still_serving(served: Served) -> None:
    assert served.process.poll() is None, served.output()[-2000:]
    assert httpx.get(served.url + "/health", timeout=10).status_code == 200


# ----------------------------------------------------------------------------- sizes


def test_oversized_bodies_are_413_announced_or_streamed(small_infer):
    big = json.dumps({"query": "q", "context": "x" * (3 << 20)}).encode()
    problem(post(small_infer, big), 413, "limit")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is found while reading
        for i in range(0, len(big), 1 << 16):
            yield big[i : i + (1 << 16)]

    problem(post(small_infer, chunks()), 413, "over the limit")
    still_serving(small_infer)


@pytest.mark.parametrize("path", ["/", "/nowhere"])
def test_an_announced_huge_body_is_refused_before_it_is_sent(plane, path):
    """10 GB announced, one byte sent: the answer comes at once, nothing waits for the rest."""
    url = urlsplit(plane.served.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  "Content-Length: 10000000000\r\n\r\n{".encode())  # fmt: skip
        head = s.recv(4096).split(b"\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 4"), head
    assert (b"413" in head) == (path == "/")
    still_serving(plane.served)


def test_huge_headers_are_4xx(plane):
    for headers in ({"x-big": "a" * 100_000}, {f"x-h{i}": "v" for i in range(300)}):
        r = httpx.post(plane.served.url + "/", json=plane.body, headers=headers, timeout=30)
        assert 400 <= r.status_code < 500 and "Header" in r.text, r.text[:300]
        still_serving(plane.served)


# ----------------------------------------------------------------------------- unreadable bodies


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"context": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"query": "caf\xe9"}', "UTF-8"),
        (b'{"code": "1", "query": "q", "context": "\\udc80"}', "without its pair"),
    ],
    ids=["nested", "nested-field", "latin-1", "lone-surrogate"],
)
def test_unreadable_json_is_400(plane, content, words):
    problem(post(plane.served, content, {"content-type": "application/json"}), 400, words)
    still_serving(plane.served)


# ----------------------------------------------------------------------------- CloudEvents

CE = {"ce-specversion": "1.0", "ce-id": "e1", "ce-source": "/tests", "ce-type": None,
      "content-type": "application/json"}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"ce-specversion": "0.1"}, ("specversion 1.0",)),
        ({"ce-specversion": "9.9"}, ("specversion 1.0",)),
        ({"ce-id": None}, ("ce-id",)),
        ({"ce-source": None}, ("ce-source",)),
        ({"ce-type": ""}, ("ce-type",)),
        ({"ce-type": "com.example.unknown"}, ("not handled here", "dev.rlm.")),
    ],
    ids=["spec-0.1", "spec-9.9", "no-id", "no-source", "no-type", "unknown-type"],
)
def test_bad_binary_events_are_400(plane, change, words):
    headers = {**CE, "ce-type": plane.event_type, **change}
    headers = {k: v for k, v in headers.items() if v is not None}
    problem(post(plane.served, json.dumps(plane.body).encode(), headers), 400, *words)
    still_serving(plane.served)


@pytest.mark.parametrize("data", [b"\xff\xfe", b"{nope", b""], ids=["utf-8", "json", "empty"])
def test_unreadable_event_data_is_400(plane, data):
    problem(post(plane.served, data, {**CE, "ce-type": plane.event_type}), 400, "data")


@pytest.mark.parametrize("missing", ["id", "source", "type", "specversion"])
def test_structured_events_missing_an_attribute_are_400(plane, missing):
    headers, body = to_structured(CloudEvent({"type": plane.event_type, "source": "/t"}, {}))
    envelope = json.loads(body)
    del envelope[missing]
    problem(post(plane.served, json.dumps(envelope).encode(), dict(headers)), 400, missing)
    still_serving(plane.served)


@pytest.mark.parametrize("path", ["/infer/%0Abad/cancel", "/execute/%0A", "/%0A"])
def test_a_url_no_route_takes_is_a_json_404(plane, path):
    response = httpx.post(plane.served.url + path, timeout=10)
    assert response.headers["content-type"].startswith("application/json")
    problem(response, 404, "this function serves")
    still_serving(plane.served)


# ----------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("number", "words"),
    [
        (b"NaN", "NaN"),
        (b"Infinity", "Infinity"),
        (b"-Infinity", "-Infinity"),
        (b"1e400", "too large for a float"),
        (b"9" * 5001, "more than 4300 digits"),
    ],
    ids=["nan", "infinity", "minus-infinity", "overflow", "5001-digits"],
)
def test_numbers_no_field_can_mean_are_400(plane, number, words):
    for field in (b"timeout", b"max_budget_usd", b"context"):
        content = json.dumps(plane.body).encode()[:-1] + b', "' + field + b'": ' + number + b"}"
        problem(post(plane.served, content, {"content-type": "application/json"}), 400, words)
    structured = json.dumps({"specversion": "1.0", "id": "n1", "source": "/t",
                             "type": plane.event_type, "data": {"x": 1}}).encode()  # fmt: skip
    structured = structured.replace(b'"x": 1', b'"x": ' + number)
    headers = {"content-type": "application/cloudevents+json"}
    problem(post(plane.served, structured, headers), 400, words)
    binary = json.dumps(plane.body).encode()[:-1] + b', "x": ' + number + b"}"
    problem(post(plane.served, binary, {**CE, "ce-type": plane.event_type}), 400, words)
    still_serving(plane.served)


# ----------------------------------------------------------------------------- the request head


def raw_request(served: Served, data: bytes, timeout: float = 10) -> tuple[int, bytes, float]:
    """Send `data` on a fresh connection; the status, the body and the seconds it took."""
    url = urlsplit(served.url)
    started = time.monotonic()
    with socket.create_connection((url.hostname, url.port), timeout=timeout) as s:
        s.sendall(data)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < _length(reply):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body, time.monotonic() - started


def _length(reply: bytes) -> int:
    for line in reply.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 1 << 30


def test_a_long_request_line_is_414_at_once_and_not_echoed(plane):
    path = b"/" + b"echo-me-" * (6 << 17)  # 6 MB
    status, body, seconds = raw_request(
        plane.served, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert status == 414 and b"echo-me" not in body and seconds < 2, (status, body[:200])
    assert json.loads(body)["error"].startswith("URI Too Long")
    still_serving(plane.served)


@pytest.mark.parametrize(
    "head",
    [
        b"G\x01T /echo-me HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /echo-me HTTP/7.echo-me\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad\x01Name-echo-me: v\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX: echo-me\x00\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"echo-me" * 20_000 + b"\r\n\r\n",
    ],
    ids=["method", "version", "header-name", "header-value", "header-size"],
)
def test_a_malformed_head_is_a_json_4xx_that_echoes_nothing(plane, head):
    status, body, _ = raw_request(plane.served, head)
    assert 400 <= status < 500 and b"echo-me" not in body, (status, body[:200])
    assert json.loads(body)["error"]
    still_serving(plane.served)


# ----------------------------------------------------------------------------- slow clients

SLOW_ENV = {"THREADS": "4"}


@pytest.fixture(scope="module", params=["execute", "infer"])
def slow_plane(request, tmp_path_factory, scripted_llm, stack) -> Iterator[Served]:
    """A plane with 4 threads and a 3 s read timeout."""
    tmp = tmp_path_factory.mktemp(f"slow-{request.param}")
    if request.param == "execute":
        served = serve("execute", {**SLOW_ENV, "EXECUTE_READ_TIMEOUT": "3"}, tmp,
                       ready="/health/readiness")  # fmt: skip
    else:
        port = free_port()
        env = infer_env(scripted_llm, stack.execute.url, port, INFER_READ_TIMEOUT="3", **SLOW_ENV)
        served = serve("infer", env, tmp, port=port)
    yield served
    served.stop()


def _drip(served: Served, head: bytes, first: bytes, seconds: float, out: list) -> None:
    """Send `head` and `first` at once, then a byte a second: what comes back, and when."""
    url = urlsplit(served.url)
    started = time.monotonic()
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(head + first)
        reply = b""
        while time.monotonic() - started < seconds:
            try:
                s.sendall(b" ")
            except OSError:
                break
            s.settimeout(1)
            try:
                reply += s.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if reply:
                break
    out.append((reply.split(b"\r\n", 1)[0], time.monotonic() - started))


def test_slow_clients_take_no_thread_and_are_cut_at_the_read_timeout(slow_plane):
    post_head = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n")  # fmt: skip
    heads = [post_head] * 6 + [b"POST / HTTP/1.1\r\nHost: x\r\nX-Slow: "] * 6  # bodies, heads
    replies: list = []
    drippers = [threading.Thread(target=_drip, args=(slow_plane, h, b"", 10, replies))
                for h in heads]  # fmt: skip
    for t in drippers:
        t.start()
    time.sleep(0.5)
    health = []
    for _ in range(5):  # twelve slow clients and four threads: health is answered at once
        started = time.monotonic()
        assert httpx.get(slow_plane.url + "/health", timeout=5).status_code == 200
        health.append(time.monotonic() - started)
        time.sleep(0.3)
    for t in drippers:
        t.join()
    assert max(health) < 0.5, health
    assert len(replies) == 12
    for first_line, seconds in replies:  # 408 at the 3 s read timeout (checked each second)
        assert b" 408 " in first_line and seconds < 6, (first_line, seconds)
    still_serving(slow_plane)


def test_a_large_body_read_by_a_thread_keeps_the_read_timeout(slow_plane):
    head = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 4000000\r\n\r\n")  # fmt: skip
    replies: list = []
    _drip(slow_plane, head, b'{"code": "' + b"x" * 1_500_000, 10, replies)
    first_line, seconds = replies[0]
    assert b" 408 " in first_line and seconds < 5, (first_line, seconds)
    still_serving(slow_plane)


# ----------------------------------------------------------------------------- event attributes


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("id", "i" * 257),
        ("id", "with space"),
        ("id", "tab\there"),
        ("id", "caf\u00e9"),
        ("source", "/" + "s" * 1024),
        ("type", "t" * 257),
    ],
    ids=["long-id", "space", "tab", "non-ascii", "long-source", "long-type"],
)
def test_event_attributes_are_capped_and_not_echoed(plane, attribute, value):
    envelope = {"specversion": "1.0", "id": "ok-1", "source": "/t", "type": plane.event_type,
                "data": plane.body, attribute: value}  # fmt: skip
    headers = {"content-type": "application/cloudevents+json"}
    response = post(plane.served, json.dumps(envelope).encode(), headers)
    problem(response, 400, attribute, "printable ASCII")
    assert value not in response.text
    if value.isascii() and "\t" not in value:
        binary = {**CE, "ce-type": plane.event_type, f"ce-{attribute}": value}
        response = post(plane.served, json.dumps(plane.body).encode(), binary)
        problem(response, 400, attribute, "printable ASCII")
        assert value not in response.text
    still_serving(plane.served)


def test_a_huge_event_id_costs_a_400_not_memory(plane):
    envelope = {"specversion": "1.0", "id": "i" * (16 << 20), "source": "/t",
                "type": plane.event_type, "data": plane.body}  # fmt: skip
    headers = {"content-type": "application/cloudevents+json"}
    for _ in range(3):
        response = post(plane.served, json.dumps(envelope).encode(), headers)
        problem(response, 400, "id")
        assert len(response.content) < 1000
    header = {**CE, "ce-type": plane.event_type, "ce-id": "i" * 100_000}
    response = post(plane.served, json.dumps(plane.body).encode(), header)
    assert response.status_code == 431 and len(response.content) < 1000
    still_serving(plane.served)

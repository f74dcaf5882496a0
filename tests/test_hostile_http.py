"""Hostile HTTP input against both functions as real processes: every answer is a clear 4xx
that says what to fix, and the process goes on serving. (test_execute_http.py holds the
execute plane's ordinary bad requests; these add what it lacks, for both planes.)"""

from __future__ import annotations

import json
import socket
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

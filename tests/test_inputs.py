"""context_uri: fetched by infer only under the operator's prefixes, never past a redirect."""

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from functions.errors import Unprocessable
from functions.infer.inputs import load_context
from functions.testing.haystack import haystack
from functions.urls import Allowlist

TEXT = haystack(200_000, 31337)


@pytest.fixture(scope="module")
def files() -> Iterator[str]:
    """A loopback file server: /haystack.txt, /data.json, and /away redirecting elsewhere."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            routes = {
                "/haystack.txt": (200, "text/plain", TEXT.encode()),
                "/data.json": (200, "application/json", b'{"rows": [1, 2]}'),
            }
            status, kind, body = routes.get(self.path, (404, "text/plain", b"no"))
            if self.path == "/away":
                status, body = 302, b""
            self.send_response(status)
            if self.path == "/away":
                self.send_header("location", "http://169.254.169.254/latest/meta-data/")
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def allowed(*prefixes: str) -> Allowlist:
    return Allowlist.of("INFER_CONTEXT_URL_PREFIXES", prefixes)


def test_a_url_under_the_prefixes_is_fetched(files):
    prefixes = allowed(files + "/")
    assert load_context(None, files + "/haystack.txt", 1 << 20, prefixes) == TEXT
    assert load_context(None, files + "/data.json", 1 << 20, prefixes) == {"rows": [1, 2]}


@pytest.mark.parametrize(
    ("path", "prefixes", "words"),
    [
        ("/haystack.txt", ("",), "INFER_CONTEXT_URL_PREFIXES"),  # none until configured
        ("/haystack.txt", ("https://data.example.com/",), "not under"),
        ("/away", None, "302"),  # the redirect is not followed out of the prefixes
        ("/haystack.txt", None, "over 1000 bytes"),
    ],
)
def test_a_url_is_refused_with_the_reason(files, path, prefixes, words):
    limit = 1000 if words.startswith("over") else 1 << 20
    with pytest.raises(Unprocessable, match=words):
        load_context(None, files + path, limit, allowed(*(prefixes or (files + "/",))))


def test_a_run_on_a_fetched_context(stack, llm, files):
    body = {"query": "What is the magic number?", "context_uri": files + "/haystack.txt"}
    r = httpx.post(stack.infer.url + "/infer", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["answer"] == "31337"

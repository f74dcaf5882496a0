"""One URL check (functions/urls.py) for every URL a request can make a plane reach.

A corpus of URLs that point past an allowed prefix (dot-segments plain and encoded, userinfo,
other spellings of the same host, other ports and schemes, encoded slashes, backslashes,
control characters) is sent to each door: infer's `context_uri`, infer's HTTP tools and
execute's `callback.url`, each served as a real process. A loopback listener stands for every
server these URLs name; it shows that the refused ones reached nothing, that redirects are
not followed, and that execute does not pass on what a callback answered.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Iterator

import httpx
import pytest

from functions.config import ConfigError
from functions.testing.listener import Listener
from functions.testing.processes import Served
from functions.testing.scripted_model import repl, scripted_replies
from functions.urls import Allowlist, UrlRefused, is_public, parse_prefixes
from tests.conftest import free_port, infer_env, serve

SECRET = b"SECRET-BODY-of-a-server-no-caller-may-read"


def hostile(origin: str, port: int) -> list[str]:
    """URLs that must all be refused when only `{origin}/ok` is allowed (`origin` is
    http://127.0.0.1:<port>)."""
    return [
        f"{origin}/private",
        f"{origin}/okay",  # the prefix's path, not at a segment boundary
        f"{origin}/ok.txt",
        f"{origin}/ok/../private",
        f"{origin}/ok/./../private",
        f"{origin}/ok/%2e%2e/private",
        f"{origin}/ok/%2E%2E/private",
        f"{origin}/ok/.%2e/private",
        f"{origin}/ok/%252e%252e/private",  # encoded twice
        f"{origin}/ok/%25252e%25252e/private",  # three times
        f"{origin}/ok/..;/private",  # a path parameter: ".." to some servers
        f"{origin}/ok/%EF%BC%8E%EF%BC%8E/private",  # full-width dots
        f"{origin}/ok%2F..%2Fprivate",
        f"{origin}/ok/..%2Fprivate",
        f"{origin}/ok/%2F%2Fprivate",
        f"{origin}/ok/..%5Cprivate",
        f"{origin}/ok\\..\\private",
        f"{origin}/ok/%C0%AE%C0%AE/private",  # overlong UTF-8 dots
        f"{origin}/ok/%00",
        f"{origin}/ok/x%0d%0aHost:%20evil",
        f"{origin}/ok/x\r\nHost: evil",
        f"{origin}/ok/ x",
        f"{origin}/ok/x#fragment",
        f"{origin}/OK/x",  # paths are case-sensitive
        f"http://user@127.0.0.1:{port}/ok/x",
        f"http://127.0.0.1:{port}@127.0.0.1:{port}/ok/x",
        f"http://evil.example@127.0.0.1:{port}/ok/x",
        f"http://127.0.0.1:{port}%40evil.example/ok/x",
        f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}/ok/x",
        f"http://127.0.0.1:0{port}/ok/x",
        f"http://127.0.0.1:{port}:80/ok/x",
        "http://127.0.0.1/ok/x",  # the default port is another port
        f"https://127.0.0.1:{port}/ok/x",
        f"http://localhost:{port}/ok/x",  # another name for the same host
        f"http://2130706433:{port}/ok/x",  # decimal
        f"http://0x7f000001:{port}/ok/x",  # hex
        f"http://0x7f.0.0.1:{port}/ok/x",
        f"http://0177.0.0.1:{port}/ok/x",  # octal
        f"http://127.1:{port}/ok/x",  # shortened
        f"http://127.0.0.1.:{port}/ok/x",  # trailing dot
        f"http://[::1]:{port}/ok/x",
        f"http://[::ffff:127.0.0.1]:{port}/ok/x",
        f"http://[::ffff:7f00:1]:{port}/ok/x",
        f"http://[127.0.0.1]:{port}/ok/x",
        f"http://[fe80::1%25lo]:{port}/ok/x",
        f"http:/127.0.0.1:{port}/ok/x",
        f"ftp://127.0.0.1:{port}/ok/x",
        f"http://127.0.0.1:{port}/ok/" + "a" * 5000,
    ]


def allowed_controls(origin: str) -> list[tuple[str, str]]:
    """(URL, the request line's path the listener must see) for URLs that are allowed."""
    return [
        (f"{origin}/ok", "/ok"),
        (f"{origin}/ok/file.txt", "/ok/file.txt"),
        (f"{origin}/ok/file.txt?version=2", "/ok/file.txt?version=2"),
        (f"http://127.0.0.1:{origin.rsplit(':', 1)[1]}/ok/a%20b", "/ok/a%20b"),
    ]


# ------------------------------------------------------------------------------ the check


@pytest.fixture
def origin() -> tuple[str, int]:
    port = 8443
    return f"http://127.0.0.1:{port}", port


def test_the_corpus_is_refused_and_the_controls_allowed(origin):
    base, port = origin
    allowed = Allowlist.of("RLM_TOOL_URL_PREFIXES", f"{base}/ok")
    for url in hostile(base, port):
        with pytest.raises(UrlRefused):
            allowed.check(url)
    for url, _ in allowed_controls(base):
        allowed.check(url)
    allowed.check(f"HTTP://127.0.0.1:{port}/ok/x")  # schemes compare without case


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://files.example/ctx/../x", "dot-segment"),
        ("https://files.example/ctx/%2e%2E/x", "dot-segment"),
        ("https://partner.example@evil.example/x", "userinfo"),
        ("https://files.example./ctx/x", "trailing dot"),
        ("http://2130706433/ctx/x", "four decimal numbers"),
        ("https://files.example/ctx%2fx", "encoded /"),
        ("https://files.example/ctx\\x", "backslash"),
        ("https://files.example/ctx/x#y", "fragment"),
        ("https://files.example:8443/ctx/x", "not under RLM_TOOL_URL_PREFIXES"),
        ("https://files.example/ctxx", "not under RLM_TOOL_URL_PREFIXES"),
        ("https://files.example/%252e%252e%252f", "encoded /"),
        ("HTTPS://files.example/ctx/%2e%2e/x", "dot-segment"),
    ],
)
def test_each_refusal_says_why(url, reason):
    allowed = Allowlist.of(
        "RLM_TOOL_URL_PREFIXES", "https://files.example/ctx,https://partner.example"
    )
    with pytest.raises(UrlRefused, match=reason):
        allowed.check(url, "url")


def test_hosts_compare_without_case_and_default_ports_equal_their_absence():
    allowed = Allowlist.of("X", "https://Files.Example/ctx/")
    for url in ("https://files.example/ctx/a", "https://FILES.EXAMPLE:443/ctx/a"):
        assert allowed.check(url)[0].host == "files.example"
    with pytest.raises(UrlRefused):
        allowed.check("http://files.example/ctx/a")  # another scheme, another port


def test_a_port_of_star_is_any_port_of_that_host_only():
    allowed = Allowlist.of("X", "http://127.0.0.1:*/ok")
    allowed.check("http://127.0.0.1:1234/ok/x")
    for url in ("http://localhost:1234/ok/x", "http://127.0.0.1:1234/no", "http://127.0.0.1:*/ok"):
        with pytest.raises(UrlRefused):
            allowed.check(url)


@pytest.mark.parametrize(
    "prefix",
    ["ftp://files.example/", "https://user@files.example/", "https://files.example/a/../b",
     "https://files.example/?q=1", "https://files.example./", "files.example/ctx",
     "https://files.example:0/", "https://files.example:99999/", "http://[::1%25eth0]/"],
)  # fmt: skip
def test_a_malformed_prefix_stops_the_start_naming_its_setting(prefix):
    with pytest.raises(ConfigError, match="INFER_CONTEXT_URL_PREFIXES"):
        parse_prefixes(prefix, "INFER_CONTEXT_URL_PREFIXES")


def test_which_prefixes_name_a_private_destination():
    names = {p.text: p.names_private for p in parse_prefixes(
        "http://10.0.0.7:8080/,http://localhost:9/,http://rlm-infer.rlm.svc.cluster.local,"
        "http://tools.tools.svc/,https://api.example.com/,https://svc.example.com/,"
        "https://a.b.svcx.example/", "X")}  # fmt: skip
    assert names == {
        "http://10.0.0.7:8080/": True,
        "http://localhost:9/": True,
        "http://rlm-infer.rlm.svc.cluster.local": True,
        "http://tools.tools.svc/": True,
        "https://api.example.com/": False,
        "https://svc.example.com/": False,
        "https://a.b.svcx.example/": False,
    }


@pytest.mark.parametrize(
    ("address", "public"),
    [("8.8.8.8", True), ("2001:4860:4860::8888", True), ("127.0.0.1", False),
     ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
     ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False),
     ("224.0.0.1", False), ("::1", False), ("fe80::1", False), ("fc00::1", False),
     ("::ffff:10.0.0.1", False), ("::ffff:8.8.8.8", True), ("2002:7f00:1::", False),
     ("::", False)],
)  # fmt: skip
def test_which_addresses_are_public(address, public):
    assert is_public(ipaddress.ip_address(address)) is public


def _private_name() -> str:
    """This machine's host name, when it resolves to loopback or a private address only."""
    name = socket.gethostname()
    try:
        found = {i[4][0] for i in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
    except OSError:
        pytest.skip(f"{name} does not resolve here")
    if name == "localhost" or any(is_public(ipaddress.ip_address(a)) for a in found):
        pytest.skip(f"{name} resolves to {found}: not a private-only name")
    return name


def test_a_name_that_resolves_to_a_private_address_is_refused():
    name = _private_name()
    allowed = Allowlist.of("RLM_TOOL_URL_PREFIXES", f"http://{name}:8080/")
    allowed.check(f"http://{name}:8080/x")  # its form is fine ...
    with pytest.raises(UrlRefused, match="loopback, link-local or private"):
        allowed.target(f"http://{name}:8080/x")  # ... where it leads is not


def test_a_target_is_the_checked_address_with_the_host_kept():
    allowed = Allowlist.of("X", "https://127.0.0.1:8443/,http://[::1]:8080/")
    target = allowed.target("https://127.0.0.1:8443/a?b=c")
    assert target.connect_url == "https://127.0.0.1:8443/a?b=c"
    assert target.headers == {"Host": "127.0.0.1:8443"}
    assert target.extensions == {"sni_hostname": "127.0.0.1"}
    assert target.options()["follow_redirects"] is False
    v6 = allowed.target("http://[0:0::1]:8080/x")
    assert v6.connect_url == "http://[::1]:8080/x" and v6.headers == {"Host": "[::1]:8080"}


# ------------------------------------------------------------------------------ through infer


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    routes = {
        "/ok": (200, {"content-type": "text/plain"}, b"the context"),
        "/ok/file.txt": (200, {"content-type": "text/plain"}, b"the context"),
        "/ok/file.txt?version=2": (200, {"content-type": "text/plain"}, b"the context"),
        "/ok/a%20b": (200, {"content-type": "text/plain"}, b"the context"),
        "/ok/tool": (200, {"content-type": "application/json"}, b'{"fine": true}'),
        "/private": (200, {"content-type": "text/plain"}, SECRET),
    }
    with Listener(routes) as heard:
        heard.routes["/ok/redirect"] = (302, {"location": heard.url + "/private"}, b"")
        problem = json.dumps({"error": SECRET.decode()}).encode()
        heard.routes["/ok/subcalls-secret"] = (403, {"content-type": "application/json"}, problem)
        heard.routes["/ok/subcalls-redirect"] = (307, {"location": heard.url + "/private"}, b"")
        yield heard


@pytest.fixture(scope="module")
def guarded_infer(stack, scripted_llm, listener, tmp_path_factory) -> Iterator[Served]:
    """An infer whose context_uri and tools may be only under the listener's /ok."""
    port = free_port()
    allowed = f"{listener.url}/ok"
    env = infer_env(scripted_llm, stack.execute.url, port, INFER_CONTEXT_URL_PREFIXES=allowed,
                    RLM_TOOL_URL_PREFIXES=allowed)  # fmt: skip
    served = serve("infer", env, tmp_path_factory.mktemp("guarded"), port=port)
    yield served
    served.stop()


def test_context_uri_corpus_reaches_nothing(guarded_infer, listener, llm):
    listener.heard.clear()
    for url in hostile(listener.url, listener.port):
        r = httpx.post(guarded_infer.url + "/infer", json={"query": "q", "context_uri": url},
                       timeout=30)  # fmt: skip
        assert r.status_code == 422, (url, r.status_code, r.text)
        assert SECRET.decode() not in r.text
    assert listener.heard == [] and llm.requests == []


def test_context_uri_controls_are_fetched_as_given(guarded_infer, listener, llm):
    for url, path in allowed_controls(listener.url):
        listener.heard.clear()
        r = httpx.post(guarded_infer.url + "/infer", json={"query": "q", "context_uri": url},
                       timeout=60)  # fmt: skip
        assert r.status_code == 200, (url, r.text)
        assert listener.paths() == [path]
        assert listener.heard[0].headers["host"] == f"127.0.0.1:{listener.port}"


def test_a_context_uri_redirect_is_not_followed(guarded_infer, listener, llm):
    listener.heard.clear()
    body = {"query": "q", "context_uri": listener.url + "/ok/redirect"}
    r = httpx.post(guarded_infer.url + "/infer", json=body, timeout=30)
    assert r.status_code == 422 and "302" in r.json()["error"]
    assert listener.paths() == ["/ok/redirect"] and llm.requests == []


def test_tool_url_corpus_is_refused_before_the_run(guarded_infer, listener, llm):
    listener.heard.clear()
    for url in hostile(listener.url, listener.port):
        for field in ("custom_tools", "custom_sub_tools"):
            body = {"query": "q", "context": "c", field: {"t": {"url": url}}}
            r = httpx.post(guarded_infer.url + "/infer", json=body, timeout=30)
            assert r.status_code == 422, (url, r.status_code, r.text)
    assert listener.heard == [] and llm.requests == []


def test_a_tool_is_called_at_its_url_and_never_past_a_redirect(guarded_infer, listener, llm):
    listener.heard.clear()
    code = (
        "out = [tool()]\n"
        "try:\n    moved()\nexcept ToolError as e:\n    out.append(str(e))\n"
        "answer.update(content=repr(out), ready=True)"
    )
    llm.switch.current = scripted_replies([repl(code)])
    tools = {"tool": {"url": listener.url + "/ok/tool"},
             "moved": {"url": listener.url + "/ok/redirect"}}  # fmt: skip
    body = {"query": "q", "context": "c", "custom_tools": tools}
    r = httpx.post(guarded_infer.url + "/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["answer"] == repr([{"fine": True}, "moved: HTTP 302: "])
    assert listener.paths() == ["/ok/tool", "/ok/redirect"]  # /private never asked for


def test_a_name_resolving_to_a_private_address_reaches_nothing(stack, scripted_llm, listener,
                                                               tmp_path_factory):  # fmt: skip
    name = _private_name()
    port = free_port()
    named = f"http://{name}:{listener.port}/ok"
    env = infer_env(scripted_llm, stack.execute.url, port, INFER_CONTEXT_URL_PREFIXES=named)
    served = serve("infer", env, tmp_path_factory.mktemp("named"), port=port)
    try:
        listener.heard.clear()
        body = {"query": "q", "context_uri": named + "/file.txt"}
        r = httpx.post(served.url + "/infer", json=body, timeout=30)
        assert r.status_code == 422 and "private address" in r.json()["error"], r.text
        assert listener.heard == []
    finally:
        served.stop()


# ------------------------------------------------------------------------------ execute's callbacks


CALL = """
try:
    print('ANSWER', llm_query('hi'))
except SubcallError as e:
    print('REFUSED', e)
"""


@pytest.fixture(scope="module")
def guarded_execute(listener, tmp_path_factory) -> Iterator[Served]:
    """An execute that posts sub-calls only under the listener's /ok."""
    env = {"EXECUTE_CALLBACK_ORIGINS": f"{listener.url}/ok"}
    served = serve("execute", env, tmp_path_factory.mktemp("guarded"), ready="/health/readiness")
    yield served
    served.stop()


def _cell(execute: Served, url: str) -> str:
    body = {"code": CALL, "callback": {"url": url, "token": "t"}}
    r = httpx.post(execute.url + "/execute", json=body, timeout=60)
    if r.status_code == 422:  # the URL is not even an http(s) URL: refused with the request
        return "REFUSED " + r.text
    assert r.status_code == 200, (url, r.text)
    return r.json()["stdout"]


def test_callback_corpus_reaches_nothing(guarded_execute, listener):
    listener.heard.clear()
    for url in hostile(listener.url, listener.port):
        out = _cell(guarded_execute, url)
        assert out.startswith("REFUSED"), (url, out)
    assert listener.heard == []


def test_a_callback_answer_is_not_passed_on_nor_its_redirect_followed(guarded_execute, listener):
    listener.heard.clear()
    refused = _cell(guarded_execute, listener.url + "/ok/subcalls-secret")
    assert "REFUSED sub-call refused (HTTP 403)" in refused and SECRET.decode() not in refused
    moved = _cell(guarded_execute, listener.url + "/ok/subcalls-redirect")
    assert "REFUSED sub-call refused (HTTP 307)" in moved and SECRET.decode() not in moved
    assert listener.paths() == ["/ok/subcalls-secret", "/ok/subcalls-redirect"]
    assert listener.heard[0].headers["authorization"] == "Bearer t"


def test_execute_with_no_callback_origins_sends_no_sub_call(listener, tmp_path_factory):
    env = {"EXECUTE_CALLBACK_ORIGINS": ""}
    served = serve("execute", env, tmp_path_factory.mktemp("closed"), ready="/health/readiness")
    try:
        listener.heard.clear()
        out = _cell(served, listener.url + "/ok/subcalls-secret")
        assert "REFUSED sub-call not sent" in out and "EXECUTE_CALLBACK_ORIGINS" in out
        assert listener.heard == []
    finally:
        served.stop()

"""Caller-defined tools: functions of the embedding process, and HTTP endpoints through infer."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from functions.contract import ToolSpec
from functions.infer import tokens, tools
from functions.sdk import RLM
from functions.testing.scripted_model import repl, scripted_replies
from functions.urls import Allowlist


def backend(model) -> dict[str, str]:
    return {"base_url": model.base_url, "api_key": "k", "model_name": "scripted-root"}


CATCH = """
def attempt(call):
    try:
        return ["ok", call()]
    except Exception as e:
        return [type(e).__name__, str(e)]
"""


def test_embedded_tool_runs_on_the_host(llm):
    calls = []

    def lookup(city: str, year: int = 2026) -> dict:
        """Population of a city in a year."""
        calls.append((city, year))
        return {"city": city, "population": 42}

    def boom(x):
        raise KeyError("nope")

    code = CATCH + (
        "r = lookup('Oslo', year=2020)\n"
        "out = [r['population'], attempt(lambda: boom(1)), attempt(lambda: lookup(object()))]\n"
        "answer.update(content=repr(out), ready=True)"
    )
    llm.switch.current = scripted_replies([repl(code)])
    with RLM(backend(llm), custom_tools={"lookup": lookup, "boom": {"tool": boom,
             "description": "Always fails."}}) as rlm:  # fmt: skip
        result = rlm.completion("ctx", root_prompt="q")
    assert calls == [("Oslo", 2020)]
    out = eval(result.response)
    assert out[0] == 42
    assert out[1] == ["ToolError", "boom raised KeyError: 'nope'"]
    assert out[2][0] == "TypeError" and "must be JSON values" in out[2][1]
    system = llm.root_requests()[0].messages[0]["content"]
    assert "`lookup(city: str, year: int = 2026) -> dict`: Population of a city" in system
    assert "`boom(x)`: Always fails." in system


def test_embedded_tool_arguments_must_be_json(llm):
    llm.switch.current = scripted_replies(
        [repl("try:\n    echo(object())\nexcept TypeError as e:\n    FINAL(str(e))")]
    )
    with RLM(backend(llm), custom_tools={"echo": lambda x: x}) as rlm:
        result = rlm.completion("ctx", root_prompt="q")
    assert "arguments must be JSON values" in result.response


def test_custom_sub_tools_are_what_child_rlms_get(llm):
    """As in the official library: children get custom_sub_tools (None: the same tools)."""

    def policy(request):
        if not request.is_root:
            return "plain"
        if "`context` is a str of 2 characters" in request.messages[1]["content"]:  # the child
            return repl("FINAL(f\"{'root_only' in globals()} {child_tool()}\")")
        return repl("answer.update(content=rlm_query('go') + ' ' + root_only(), ready=True)")

    llm.switch.current = policy
    with RLM(backend(llm), max_depth=1, custom_tools={"root_only": lambda: "R"},
             custom_sub_tools={"child_tool": lambda: "C"}) as rlm:  # fmt: skip
        result = rlm.completion("ctx", root_prompt="q")
    assert result.response == "False C R"
    root, child = (r.messages[0]["content"] for r in llm.root_requests()[:2])
    assert "root_only" in root and "child_tool" not in root
    assert "child_tool" in child and "root_only" not in child


def test_reserved_names_are_refused(llm):
    with pytest.raises(ValueError, match="reserved"):
        RLM(backend(llm), custom_tools={"llm_query": lambda: 1}).completion("c")


def test_token_scopes_tools_by_spec_digest():
    spec = ToolSpec(url="http://127.0.0.1:9/t")
    claims = tokens.TokenClaims(run_id="r", depth=0, max_depth=1, exp=2**40, models=[],
                                nonce="n", owner="o", root="r", prompts=9,
                                tools={"t": tools.digest(spec)})  # fmt: skip
    assert tools.authorize(claims, "t", {"t": spec}) == spec
    with pytest.raises(tokens.OutOfScope, match="no tool named 'u'"):
        tools.authorize(claims, "u", {"u": spec})
    moved = spec.model_copy(update={"url": "http://169.254.169.254/"})
    with pytest.raises(tokens.OutOfScope, match="does not match"):
        tools.authorize(claims, "t", {"t": moved})


def test_bind_and_check_arguments():
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
              "required": ["a"]}  # fmt: skip
    assert tools.bind(schema, ["x"], {"b": 2}) == {"a": "x", "b": 2}
    with pytest.raises(tools.ToolCallError, match="multiple values"):
        tools.bind(schema, ["x"], {"a": "y"})
    with pytest.raises(tools.ToolCallError, match="positional"):
        tools.bind(schema, [1, 2, 3], {})
    with pytest.raises(tools.ToolCallError, match='at /b: "two" is not of type "integer"'):
        tools.check_arguments(schema, {"a": "x", "b": "two"})


def test_hostile_parameter_schemas():
    """A tool's schema is the caller's: it is never fetched from, and cannot stall infer."""
    none = Allowlist.of("RLM_TOOL_URL_PREFIXES", ())
    fetched = {"type": "object", "properties": {"a": {"$ref": "http://169.254.169.254/s"}}}
    with pytest.raises(tools.BadCatalog, match="Retrieval is disabled"):
        tools.check_catalog({"t": ToolSpec(parameters=fetched, ref="r")}, {"r": len}, none)
    with pytest.raises(tools.BadCatalog, match=r"the limit is 10$"):
        tools.check_catalog({"t": ToolSpec(ref="r", description="")}, {"r": len}, none, 10)
    backtracking = {"type": "object", "properties": {"a": {"pattern": "^(a|a)*$"}}}
    started = time.monotonic()
    with pytest.raises(tools.ToolCallError, match="does not match"):
        tools.check_arguments(backtracking, {"a": "a" * 5000 + "!"})
    assert time.monotonic() - started < 1


# ------------------------------------------------------------------------------ over HTTP


@pytest.fixture(scope="module")
def tool_server() -> Iterator[tuple[str, list]]:
    """Tools on loopback: /weather answers, /fail fails, /slow is slow; and what they got."""
    seen: list = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            seen.append((self.path, body))
            status, reply = 200, {"city": body.get("city"), "temp_c": 21}
            if self.path == "/fail":
                status, reply = 500, {"error": "database down"}
            if self.path == "/slow":
                time.sleep(2)
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_http_tools_through_infer_and_execute(stack, llm, tool_server):
    url, seen = tool_server
    weather = {
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"], "additionalProperties": False},
        "url": url + "/weather",
    }  # fmt: skip
    broken = {"description": "Always fails.", "url": url + "/fail", "timeout_s": 5}
    slow = {"description": "Too slow.", "url": url + "/slow", "timeout_s": 0.3}
    code = CATCH + (
        "import json\n"
        "out = [weather('Oslo'), attempt(lambda: weather(city=5)), attempt(broken),\n"
        "       attempt(lambda: weather('a', 'b')), attempt(lambda: weather(city='x', town='y')),\n"
        "       attempt(slow)]\n"
        "answer.update(content=json.dumps(out), ready=True)"
    )
    llm.switch.current = scripted_replies([repl(code)])
    catalog = {"weather": weather, "broken": broken, "slow": slow}
    body = {"query": "q", "context": "c", "custom_tools": catalog}
    r = httpx.post(stack.infer.url + "/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["status"] == "completed", result
    ok, bad_type, failing, too_many, unknown_arg, late = json.loads(result["answer"])
    assert ok == {"city": "Oslo", "temp_c": 21}
    assert bad_type[0] == "ToolError" and 'at /city: 5 is not of type "string"' in bad_type[1]
    assert failing[0] == "ToolError" and "HTTP 500" in failing[1]
    assert too_many[0] == "ToolError" and "positional" in too_many[1]
    assert unknown_arg[0] == "ToolError" and "town" in unknown_arg[1]
    assert late == ["ToolError", "slow: timed out after 0.3 s"]
    # Only the valid call reached the tool server.
    assert [body for path, body in seen if path == "/weather"] == [{"city": "Oslo"}]


def test_http_tool_without_url_is_refused(stack):
    body = {"query": "q", "context": "c", "custom_tools": {"t": {"description": "x"}}}
    r = httpx.post(stack.infer.url + "/infer", json=body, timeout=60)
    assert r.status_code == 422 and "needs a url" in r.json()["error"]


def test_tool_urls_can_be_limited_to_prefixes():
    spec = ToolSpec(url="http://169.254.169.254/latest")

    def allowed(*prefixes: str) -> Allowlist:
        return Allowlist.of("RLM_TOOL_URL_PREFIXES", prefixes)

    with pytest.raises(ValueError, match="RLM_TOOL_URL_PREFIXES"):
        tools.check_catalog({"t": spec}, {}, allowed("https://tools.example.com/"))
    with pytest.raises(ValueError, match="calls no HTTP tools"):
        tools.check_catalog({"t": spec}, {}, allowed())  # none allowed until the operator says so
    tools.check_catalog({"t": spec}, {}, allowed("http://169.254.169.254/"))


def test_tool_calls_are_in_the_trajectory(llm):
    llm.switch.current = scripted_replies([repl("FINAL(str(add(2, 3)))")])
    with RLM(backend(llm), custom_tools={"add": lambda a, b: a + b}) as rlm:
        result = rlm.completion("ctx", root_prompt="q")
    assert result.response == "5"
    cell = next(e for e in result.metadata["trajectory"] if e["kind"] == "cell")
    assert cell["subcall_log"][0]["kind"] == "tool"
    assert cell["subcall_log"][0]["calls"][0]["response"] == "5"


def test_a_replayed_cell_does_not_call_a_tool_twice(llm):
    """The pod loses the session: infer replays the cells, tool results come from the memo."""
    calls = []
    holder = {}

    def stamp() -> int:
        calls.append(1)
        return len(calls)

    def policy(request):
        if request.turn == 1:  # lose the live session and the (over 1 MiB, not inline) state
            runner = holder["rlm"].service.executor.runner
            runner.sessions.clear()
            runner.blobs.clear()
        steps = [repl("big = 'x' * 2_000_000\nfirst = stamp()"), repl("FINAL(str(first))")]
        return steps[min(request.turn, 1)]

    llm.switch.current = policy
    with RLM(backend(llm), custom_tools={"stamp": stamp}) as rlm:
        holder["rlm"] = rlm
        result = rlm.completion("ctx", root_prompt="q")
    assert result.response == "1" and calls == [1]

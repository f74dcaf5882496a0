"""The RLM as MCP tools, driven by the MCP SDK's own client: `rlm mcp` over stdio (a real child
process, an embedded RLM) and `/mcp` on a real infer process (streamable HTTP)."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anyio
import httpx
import pytest
from mcp import Client, StdioServerParameters

from functions.testing.haystack import haystack
from functions.testing.scripted_model import (
    needle_policy,
    repl,
    scripted_replies,
    typed_answers,
)
from tests.test_callers import KEYS, keyed, keys_file  # noqa: F401
from tests.test_cancel import (  # noqa: F401
    SLOW_S,
    slow_subcalls,
    stopped_runs,
    wait_for_subcall,
)

RLM = str(Path(sys.executable).parent / "rlm")


@pytest.fixture(scope="module")
def documents() -> Iterator[str]:
    """A loopback server of contexts, under the prefixes the servers allow."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = haystack(1_500_000, 90210).encode()
            self.send_response(200)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/report.txt"
    server.shutdown()
    server.server_close()


def stdio(llm, cwd: Path | None = None, **extra: str) -> Client:
    """`rlm mcp` as an agent's MCP configuration starts it: the command and its environment
    (started in `cwd`, the folder whose files it reads by default)."""
    env = {**os.environ, "LLM_BASE_URL": llm.base_url, "LLM_MODEL": "scripted-root",
           "LLM_API_KEY": "k", "LLM_SUB_MODEL": "scripted-sub",
           "LLM_PRICES": '{"scripted-root": [1.0, 2.0], "scripted-sub": [0.5, 1.0]}',
           "INFER_CONTEXT_URL_PREFIXES": "http://127.0.0.1:*/", "MAX_ITERATIONS": "6",
           **extra}  # fmt: skip
    return Client(StdioServerParameters(command=RLM, args=["mcp"], env=env, cwd=cwd))


def http(stack, **options) -> Client:
    return Client(stack.infer.url + "/mcp", **options)


class Progress:
    def __init__(self) -> None:
        self.seen: list[tuple[float, float | None, str | None]] = []

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        self.seen.append((progress, total, message))


async def ask_needle(client: Client, **context) -> tuple[dict, Progress]:
    progress = Progress()
    result = await client.call_tool(
        "ask", {"question": "What is the magic number?", **context}, progress_callback=progress
    )
    assert not result.is_error, result.content
    assert json.loads(result.content[0].text) == result.structured_content
    return result.structured_content, progress


def paused_needle(request):
    """The needle script, its search cell pausing after its batch: the run ends right after its
    batch otherwise, and only the notification sent just before the result (which a legacy HTTP
    client does not always see) would say the sub-calls were answered."""
    return needle_policy(request).replace("found = ", "__import__('time').sleep(0.6)\nfound = ", 1)


def check_progress(progress: Progress) -> None:
    values = [p for p, _, _ in progress.seen]
    assert len(values) >= 2 and values == sorted(values) and len(set(values)) == len(values)
    assert all(total == 6.0 for _, total, _ in progress.seen)  # MAX_ITERATIONS
    last = progress.seen[-1][2]
    assert "turn 2 of 6" in last and "sub-calls 30/30 answered" in last
    assert float(last.rsplit("$", 1)[1]) > 0


async def cancel_mid_run(client: Client, llm) -> float:
    """Start a call whose cell waits on a slow sub-call, cancel it once the sub-call is in, and
    return when it was cancelled."""
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(client.call_tool, "ask", {"question": "q", "context": "c"})
            await anyio.to_thread.run_sync(wait_for_subcall, llm)
            scope.cancel()
    return time.monotonic()


# ------------------------------------------------------------------------------------- stdio


def test_stdio_tools_progress_files_and_urls(llm, documents, tmp_path):
    llm.switch.current = paused_needle
    report = tmp_path / "report.txt"
    report.write_text(haystack(3_000_000, 48213))

    async def main():
        async with stdio(llm, cwd=tmp_path) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert set(tools) == {"ask", "continue_conversation"}
            assert "context_path" in tools["ask"].input_schema["properties"]
            assert tools["ask"].output_schema["properties"]["stop_code"]
            llm.latency_s = 0.3  # each reply outlasts a look at the run's progress
            outcome, progress = await ask_needle(client, context_path="report.txt")
            llm.latency_s = 0.0
            assert outcome["answer"] == "48213" and outcome["status"] == "completed"
            assert outcome["total_cost_usd"] > 0 and outcome["usage"]["scripted-sub"]["calls"] == 30
            check_progress(progress)
            outcome, _ = await ask_needle(client, context_url=documents)
            assert outcome["answer"] == "90210"
            refused = await client.call_tool(
                "ask", {"question": "q", "context_url": "http://localhost:1/x"}
            )
            assert refused.is_error and "INFER_CONTEXT_URL_PREFIXES" in refused.content[0].text

    anyio.run(main)


def test_stdio_cancel_stops_the_run(slow_subcalls):  # noqa: F811
    async def main():
        async with stdio(slow_subcalls) as client:
            await cancel_mid_run(client, slow_subcalls)
            await anyio.sleep(SLOW_S + 2)  # the run would have asked its model again by now
        assert slow_subcalls.received == 2  # the root turn and its sub-call: no call after

    anyio.run(main)


def test_stdio_typed_answers_and_conversations(llm):
    city = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

    async def main():
        async with stdio(llm) as client:
            llm.switch.current = typed_answers([{"town": "Oslo"}, {"city": "Oslo"}])
            done = await client.call_tool(
                "ask", {"question": "Which city?", "context": "Oslo", "output_schema": city,
                        "persistent": True},
            )  # fmt: skip
            first = done.structured_content
            assert first["value"] == {"city": "Oslo"} and first["conversation_id"]
            llm.switch.current = scripted_replies(
                [repl("answer['content'] = str(len(context_0)) + context\nanswer['ready'] = 1")]
            )
            more = await client.call_tool(
                "continue_conversation",
                {"conversation_id": first["conversation_id"], "question": "?", "context": "!"},
            )
            assert more.structured_content["answer"] == "4!"
            budget = await client.call_tool(
                "ask", {"question": "q", "context": "c", "max_iterations": 1, "max_tokens": 50}
            )
            assert budget.structured_content["status"] == "stopped"
            assert budget.structured_content["stop_code"] == "max_tokens"

    anyio.run(main)


def test_stdio_bad_calls_are_errors_that_say_what_to_fix(llm, tmp_path):
    async def main():
        async with stdio(llm, cwd=tmp_path) as client:
            cases = [
                ({"question": "q", "context": "a", "context_json": ["b"]}, "context one way"),
                ({"question": "q", "contxt": "a"}, "unknown argument 'contxt'"),
                ({"question": "q", "context_path": str(tmp_path / "none")}, "cannot read"),
                ({"question": "q", "max_depth": 99}, "max_depth"),
                ({"question": "q", "output_schema": {"type": 7}}, "output_schema"),
                ({"question": ""}, "query"),
            ]
            for arguments, expected in cases:
                result = await client.call_tool("ask", arguments)
                assert result.is_error and expected in result.content[0].text, (arguments, result)
        assert llm.requests == []

    anyio.run(main)


def test_stdio_reads_regular_files_under_its_roots_only(llm, tmp_path):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    (elsewhere / "secret.txt").write_text("the magic number is 1")
    (project / "link.txt").symlink_to(elsewhere / "secret.txt")
    os.mkfifo(project / "pipe")

    async def main():
        async with stdio(llm, cwd=project) as client:
            for path, expected in (
                (str(elsewhere / "secret.txt"), "is not under"),
                ("link.txt", "is not under"),  # a link leads out of the roots
                ("../elsewhere/secret.txt", "is not under"),
                ("pipe", "not a regular file"),  # refused, not waited on
            ):
                result = await client.call_tool("ask", {"question": "q", "context_path": path})
                assert result.is_error and expected in result.content[0].text, (path, result)
        async with stdio(llm, cwd=project, RLM_MCP_FILE_ROOTS=f"{project},/dev") as client:
            result = await client.call_tool("ask", {"question": "q", "context_path": "/dev/zero"})
            assert result.is_error and "not a regular file" in result.content[0].text
        assert llm.requests == []

    anyio.run(main)


def test_rlm_mcp_without_a_model_says_so():
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    import subprocess

    done = subprocess.run([RLM, "mcp"], env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 2 and "LLM_BASE_URL" in done.stderr and done.stdout == ""


# -------------------------------------------------------------------------------------- HTTP


def test_http_tools_a_multi_megabyte_context_and_progress(stack, llm, documents):
    llm.switch.current = paused_needle

    async def main(client: Client):
        async with client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert set(tools) == {"ask", "continue_conversation"}
            assert "context_path" not in tools["ask"].input_schema["properties"]
            llm.latency_s = 0.3  # each reply outlasts a look at the run's progress
            outcome, progress = await ask_needle(client, context=haystack(3_000_000, 4711))
            llm.latency_s = 0.0
            assert outcome["answer"] == "4711" and outcome["status"] == "completed"
            check_progress(progress)
            outcome, _ = await ask_needle(client, context_url=documents)
            assert outcome["answer"] == "90210"
            path = await client.call_tool("ask", {"question": "q", "context_path": "/etc/passwd"})
            assert path.is_error and "unknown argument 'context_path'" in path.content[0].text

    anyio.run(main, http(stack))
    anyio.run(main, http(stack, mode="legacy"))  # the initialize handshake, stateless too


def test_http_cancel_stops_the_run(stack, slow_subcalls):  # noqa: F811
    before = stopped_runs(stack)

    async def main():
        async with http(stack) as client:
            cancelled = await cancel_mid_run(client, slow_subcalls)
            while stopped_runs(stack) == before and time.monotonic() - cancelled < 5:
                await anyio.sleep(0.1)
            print(f"the run stopped {time.monotonic() - cancelled:.2f} s after the cancel")
            assert stopped_runs(stack) == before + 1  # long before its sub-call would return
            await anyio.sleep(SLOW_S + 2)
        assert slow_subcalls.received == 2

    anyio.run(main)


def test_http_typed_answer(stack, llm):
    llm.switch.current = typed_answers([[1, 2, 3]])

    async def main():
        async with http(stack) as client:
            done = await client.call_tool(
                "ask", {"question": "q", "context_json": {"a": 1},
                        "output_schema": {"type": "array", "items": {"type": "integer"}}},
            )  # fmt: skip
            return done.structured_content

    outcome = anyio.run(main)
    assert outcome["value"] == [1, 2, 3] and outcome["answer"] == "[1, 2, 3]"
    assert "`context` is a dict" in llm.root_requests()[0].messages[1]["content"]


def test_http_mcp_refuses_what_it_cannot_serve(stack, llm):
    host, port = stack.infer.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(b"POST /mcp HTTP/1.1\r\nHost: infer\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n{" % (300 << 20))  # fmt: skip
        assert raw.recv(100).startswith(b"HTTP/1.1 413")
    accept = "application/json, text/event-stream"
    r = httpx.post(stack.infer.url + "/mcp", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json", "accept": accept})  # fmt: skip
    assert 400 <= r.status_code < 500 and "Traceback" not in r.text
    assert httpx.get(stack.infer.url + "/health", timeout=5).status_code == 200


def test_http_runs_are_the_key_holders_and_need_a_key(keyed, llm):  # noqa: F811
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    def client(key: str | None) -> Client:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        transport = streamable_http_client(
            keyed.url + "/mcp", http_client=httpx2.AsyncClient(headers=headers, timeout=60)
        )
        return Client(transport)

    async def main() -> dict:
        async with client(KEYS["frank"]) as frank:
            done = await frank.call_tool("ask", {"question": "q", "context": "c"})
            assert not done.is_error, done.content
            outcome = done.structured_content
            over = await frank.call_tool("ask", {"question": "q", "max_budget_usd": 50})
            assert over.is_error and "INFER_MAX_BUDGET_USD" in over.content[0].text
        return outcome

    for key in (None, "sk-not-ours"):  # refused before the MCP app sees the request
        headers = {"accept": "application/json, text/event-stream"}
        headers |= {"authorization": f"Bearer {key}"} if key else {}
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        r = httpx.post(keyed.url + "/mcp", json=ping, headers=headers)
        assert r.status_code == 401 and "error" in r.json()

    llm.switch.current = scripted_replies([repl("FINAL('42')")])
    outcome = anyio.run(main)
    assert outcome["answer"] == "42" and outcome["total_cost_usd"] > 0

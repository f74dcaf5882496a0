"""The Python API, embedded and against a deployed execute function."""

from __future__ import annotations

import asyncio
import json

import pytest

from functions.sdk import RLM
from functions.testing.haystack import haystack


def backend(model) -> dict[str, str]:
    return {"base_url": model.base_url, "api_key": "k", "model_name": "scripted-root"}


def test_embedded_completion_shape(llm, tmp_path):
    log = tmp_path / "run.jsonl"
    with RLM(backend(llm), max_depth=1, logger=str(log)) as rlm:
        result = rlm.completion(haystack(200_000, 321), root_prompt="What is the magic number?")
    assert result.response == "321" and result.status == "completed"
    # Two root turns, and two sub-calls (one per 100k chunk) on the same model: no sub_model.
    assert result.usage["scripted-root"].calls == 4
    assert result.execution_time > 0
    kinds = [json.loads(line)["kind"] for line in log.read_text().splitlines()]
    assert kinds[:2] == ["run", "llm"] and kinds[-1] == "final"


def test_acompletion_inside_an_event_loop(llm):
    async def main():
        with RLM(backend(llm)) as rlm:
            ticks = 0

            async def tick():
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            ticker = asyncio.create_task(tick())
            result = await rlm.acompletion(haystack(50_000, 8), root_prompt="magic?")
            ticker.cancel()
            return result, ticks

    result, ticks = asyncio.run(main())
    assert result.response == "8" and ticks > 0  # the loop kept running during the run


def test_remote_environment_uses_a_deployed_execute(llm, execute_server):
    with RLM(backend(llm), environment="remote",
             environment_kwargs={"url": execute_server.url}) as rlm:  # fmt: skip
        result = rlm.completion(haystack(100_000, 4242), root_prompt="magic?")
    assert result.response == "4242"
    assert result.usage["scripted-root"].calls >= 3  # root turns + sub-calls


def test_no_llm_configured_is_a_clear_error(monkeypatch):
    for name in ("LLM_BASE_URL", "LLM_MODEL", "LLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="no LLM configured"):
        RLM()
    with pytest.raises(ValueError, match="environment must be"):
        RLM({"base_url": "http://127.0.0.1:9/v1", "model_name": "m"}, environment="kubernetes")


def _guest_saw(request) -> str:
    """The root's second turn: answer with what the first cell printed."""
    seen = [line for line in request.last.splitlines() if line.startswith("GOT ")]
    return f"FINAL({seen[0] if seen else 'nothing printed'})"


@pytest.mark.parametrize("environment", ["wasm", "remote"])
def test_a_failing_sub_model_reaches_the_guest_as_that(
    llm, execute_server, monkeypatch, environment
):
    """Embedded, remote or served, the guest reads why its sub-call failed: the same message."""
    from functions.testing.scripted_model import repl, scripted_replies

    def broken(request):
        raise RuntimeError("sub-model down")

    cell = "try:\n    llm_query('q')\nexcept Exception as e:\n    print('GOT', e)"
    llm.switch.current = scripted_replies([repl(cell), _guest_saw], sub_answer=broken)
    monkeypatch.setenv("LLM_MAX_RETRIES", "0")
    options = {"url": execute_server.url} if environment == "remote" else None
    with RLM(backend(llm), environment=environment, environment_kwargs=options) as rlm:
        result = rlm.completion("ctx", root_prompt="q")
    assert result.response.startswith("GOT "), result.response
    assert "(502): the sub-model failed" in result.response, result.response
    assert "could not reach" not in result.response


def test_the_callback_server_refuses_an_oversized_body_unread(llm, execute_server):
    import socket

    from functions.infer.subcalls import MAX_BODY_BYTES

    with RLM(backend(llm), environment="remote",
             environment_kwargs={"url": execute_server.url}) as rlm:  # fmt: skip
        host, port = rlm._callback_server.server_address[:2]
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(
                b"POST /subcalls HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n"
                b"Content-Type: application/json\r\n"
                + f"Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode()
                + b"{"
            )
            reply = b""
            while chunk := s.recv(4096):  # the server answers and closes, the body unread
                reply += chunk
            reply = reply.decode()
    assert reply.startswith("HTTP/1.0 413") or reply.startswith("HTTP/1.1 413"), reply
    assert "limit" in reply

"""A scripted stand-in for an OpenAI-compatible model, on loopback.

It is not a language model: a policy function writes each reply. `rlm demo` uses it (and says
so) so the whole pipeline can be seen without an API key; the tests use it to play the model
through the real `openai` client. Faults can be queued to test retries: a status with
Retry-After, a delay, or a dropped connection.

    python -m functions.scripted_model --port 8765 --scenario needle
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

STAND_IN_NAME = "scripted-stand-in"


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]

    @property
    def is_root(self) -> bool:
        """A root RLM call carries the REPL system prompt; a sub-call is a bare question."""
        first = self.messages[0] if self.messages else {}
        return first.get("role") == "system" and "REPL" in str(first.get("content", ""))

    @property
    def turn(self) -> int:
        """How many replies the model has given in this conversation (0 on the first call)."""
        return sum(1 for m in self.messages if m.get("role") == "assistant")

    @property
    def last(self) -> str:
        return str(self.messages[-1].get("content", "")) if self.messages else ""


Policy = Callable[[ChatRequest], str]


@dataclass
class Fault:
    status: int = 0  # an HTTP status to answer instead (429, 500, ...)
    retry_after: float | None = None
    delay_s: float = 0.0  # sleep before answering
    drop: bool = False  # close the connection without an answer


@dataclass
class ScriptedModel:
    policy: Policy
    latency_s: float = 0.0
    host: str = "127.0.0.1"
    port: int = 0
    faults: deque[Fault] = field(default_factory=deque)
    requests: list[ChatRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start the model first"
        return f"http://{self.host}:{self._server.server_address[1]}/v1"

    def start(self) -> ScriptedModel:
        self._server = ThreadingHTTPServer((self.host, self.port), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> ScriptedModel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def inject(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def _next_fault(self) -> Fault | None:
        with self._lock:
            return self.faults.popleft() if self.faults else None

    def _record(self, request: ChatRequest) -> None:
        with self._lock:
            self.requests.append(request)


def _tokens(text: str) -> int:
    return len(text) // 4 + 1


def _handler(model: ScriptedModel) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if self.path.rstrip("/").endswith("/models"):
                self._json(200, {"object": "list", "data": [{"id": STAND_IN_NAME,
                                                              "object": "model"}]})  # fmt: skip
            else:
                self._json(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            fault = model._next_fault()
            if fault and fault.delay_s:
                time.sleep(fault.delay_s)
            if fault and fault.drop:
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if fault and fault.status:
                headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after else {}
                self._json(fault.status, {"error": {"message": f"scripted {fault.status}"}},
                           headers)  # fmt: skip
                return
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._json(404, {"error": {"message": "not found"}})
                return
            request = ChatRequest(body.get("model", ""), body.get("messages", []))
            model._record(request)
            if model.latency_s:
                time.sleep(model.latency_s)
            text = model.policy(request)
            prompt_tokens = sum(_tokens(str(m.get("content", ""))) for m in request.messages)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": _tokens(text),
                     "total_tokens": prompt_tokens + _tokens(text)}  # fmt: skip
            ident, created = f"chatcmpl-{time.time_ns()}", int(time.time())
            if body.get("stream"):
                self._stream(ident, created, request.model, text, usage)
                return
            self._json(200, {
                "id": ident, "object": "chat.completion", "created": created,
                "model": request.model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": usage,
            })  # fmt: skip

        def _stream(self, ident: str, created: int, name: str, text: str, usage: dict) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("connection", "close")
            self.end_headers()
            base = {"id": ident, "object": "chat.completion.chunk", "created": created,
                    "model": name}  # fmt: skip
            for delta, reason in (({"role": "assistant", "content": text}, None), ({}, "stop")):
                chunk = {**base, "choices": [{"index": 0, "delta": delta,
                                              "finish_reason": reason}]}  # fmt: skip
                if reason:
                    chunk["usage"] = usage
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True

        def _json(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

    return Handler


# ----------------------------------------------------------------------------- policies


def repl(code: str) -> str:
    return f"Let me run this.\n```repl\n{code.strip()}\n```"


def answer_from_prompt(request: ChatRequest) -> str:
    """The sub-model: finds 'the magic number is N' in its prompt, else says NONE."""
    found = re.search(r"magic number is (\d+)", request.last)
    return found.group(1) if found else "NONE"


NEEDLE_STEPS = [
    repl("print(type(context).__name__, len(context))\nprint(context[:200])"),
    repl(
        """
size = 100_000
chunks = [context[i:i + size] for i in range(0, len(context), size)]
replies = llm_query_batched(
    [f"Find the magic number in this text. Reply with just the number or NONE.\\n{c}"
     for c in chunks]
)
found = [r.strip() for r in replies if r.strip() != "NONE"]
print(len(chunks), "chunks;", "found:", found)
if found:
    answer["content"] = found[0]
    answer["ready"] = True
"""
    ),
    "I could not find it in the chunks.\nFINAL(NONE)",
]


def scripted_replies(root_replies: list[str], sub_answer: Policy = answer_from_prompt) -> Policy:
    """Root calls get `root_replies` in order (the last one repeats); sub-calls `sub_answer`."""

    def policy(request: ChatRequest) -> str:
        if not request.is_root:
            return sub_answer(request)
        return root_replies[min(request.turn, len(root_replies) - 1)]

    return policy


needle_policy = scripted_replies(NEEDLE_STEPS)
SCENARIOS: dict[str, Policy] = {"needle": needle_policy}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A scripted OpenAI-compatible stand-in model.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="needle")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per reply")
    args = parser.parse_args(argv)
    model = ScriptedModel(SCENARIOS[args.scenario], args.latency, args.host, args.port).start()
    print(f"scripted stand-in model ({args.scenario}) at {model.base_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        model.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A scripted stand-in for an OpenAI-compatible model, on loopback.

It is not a language model: a policy function writes each reply. `rlm demo` uses it (and says
so) so the whole pipeline can be seen without an API key; the tests use it to play the model
through the real `openai` client. Faults can be queued for the next requests (a status with
Retry-After, a delay, a dropped connection) and a fixed latency set, to test retries. It
records each request's output cap (`max_tokens` or `max_completion_tokens`); with `honour_cap`
it cuts a longer reply there with `finish_reason: "length"`, as a real server does, and
`refused_fields` makes it refuse one spelling the way OpenAI's reasoning models refuse
`max_tokens`.

    python -m functions.testing.scripted_model --port 8765 --scenario needle
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from functions.infer.compaction import text_tokens

STAND_IN_NAME = "scripted-stand-in"
ROOT_MARKER = "REPL"  # a system prompt holding this word makes a request a root RLM turn


@dataclass
class ModelRequest:
    """A chat-completions request as the model server received it."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    max_tokens: int | None = None  # the output cap as the request sent it, in either field
    max_completion_tokens: int | None = None

    @property
    def output_cap(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def is_root(self) -> bool:
        """A root RLM turn carries the REPL system prompt; a sub-call is a bare question."""
        first = self.messages[0] if self.messages else {}
        return first.get("role") in ("system", "developer") and ROOT_MARKER in _text(first)

    @property
    def turn(self) -> int:
        """How many replies the model has given in this conversation (0 on the first call)."""
        return sum(1 for m in self.messages if m.get("role") == "assistant")

    @property
    def last(self) -> str:
        """The text of the last message."""
        return _text(self.messages[-1]) if self.messages else ""

    def texts(self, role: str) -> list[str]:
        return [_text(m) for m in self.messages if m.get("role") == role]


Policy = Callable[[ModelRequest], str]


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


@dataclass(frozen=True)
class Fault:
    """What to do to one request instead of (or before) answering it."""

    status: int = 0  # answer with this HTTP status (429, 500, 400, ...) instead
    retry_after: float | None = None  # with a Retry-After header (seconds)
    delay_s: float = 0.0  # sleep first (longer than the client's timeout: a timeout)
    drop: bool = False  # close the connection without an answer


@dataclass
class ScriptedModel:
    policy: Policy
    latency_s: float = 0.0  # added to every answered request
    host: str = "127.0.0.1"
    port: int = 0
    api_key: str | None = None  # when set, other bearer tokens get 401
    send_usage: bool = True  # False: answers without a usage object, as some servers do
    refused_fields: frozenset[str] = frozenset()  # output-cap fields answered with a 400
    honour_cap: bool = False  # cut a reply longer than the request's output cap
    faults: deque[Fault] = field(default_factory=deque)
    requests: list[ModelRequest] = field(default_factory=list)  # the ones the policy answered
    received: int = 0  # chat requests that arrived, faulted ones included

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._busy = 0  # requests being handled (a delayed one outlives its client's timeout)
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("start the scripted model first")
        return f"http://{self.host}:{self._server.server_address[1]}/v1"

    def start(self) -> ScriptedModel:
        server = self._server = _QuietServer((self.host, self.port), _handler(self))
        serve = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="scripted-model"
        )
        serve.daemon = True
        serve.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> ScriptedModel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def inject(self, *faults: Fault, times: int = 1) -> None:
        """Apply `faults`, in order, `times` over, to the next chat requests."""
        with self._lock:
            for _ in range(times):
                self.faults.extend(faults)

    def wait_idle(self, timeout_s: float = 5.0) -> bool:
        """Wait until no request is being handled; False if some still is after `timeout_s`."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout_s)

    def reset(self, wait_s: float = 5.0) -> None:
        """No faults, latency, refused fields or cap, an empty log (once requests in flight end)."""
        self.wait_idle(wait_s)
        with self._lock:
            self.faults.clear()
            self.requests.clear()
            self.received = 0
            self.latency_s = 0.0
            self.refused_fields = frozenset()
            self.honour_cap = False

    def root_requests(self) -> list[ModelRequest]:
        with self._lock:
            return [r for r in self.requests if r.is_root]

    def sub_requests(self) -> list[ModelRequest]:
        with self._lock:
            return [r for r in self.requests if not r.is_root]

    def _arrived(self) -> Fault | None:
        with self._lock:
            self.received += 1
            return self.faults.popleft() if self.faults else None

    def _begin(self) -> None:
        with self._lock:
            self._busy += 1

    def _end(self) -> None:
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()

    def _record(self, request: ModelRequest) -> None:
        with self._lock:
            self.requests.append(request)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the default 5 drops bursts of connections: 1 s SYN retries

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that time out or are dropped on purpose break pipes; that is expected."""


_MODELS = {
    "object": "list",
    "data": [{"id": STAND_IN_NAME, "object": "model", "created": 0, "owned_by": "scripted"}],
}


def _usage(request: ModelRequest, text: str) -> dict[str, int]:
    prompt = sum(text_tokens(_text(m)) for m in request.messages)
    completion = text_tokens(text)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _capped(request: ModelRequest, text: str) -> tuple[str, str]:
    """The reply cut at the request's output cap (as `text_tokens` counts), and why it ended."""
    cap = request.output_cap
    if cap is None or text_tokens(text) <= cap:
        return text, "stop"
    return text[: max(0, cap - 1) * 4], "length"


def _refusal(field: str) -> str:
    other = "max_completion_tokens" if field == "max_tokens" else "max_tokens"
    return (
        f"Unsupported parameter: '{field}' is not supported with this model. Use '{other}' instead."
    )


def _completion(
    ident: str, request: ModelRequest, text: str, usage: dict | None, finish: str = "stop"
) -> dict:
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "finish_reason": finish, "logprobs": None, "message": message}
    body = {
        "id": ident,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [choice],
    }
    return body if usage is None else {**body, "usage": usage}


def _chunks(
    ident: str, request: ModelRequest, text: str, usage: dict | None, finish: str = "stop"
) -> list[dict]:
    """The SSE frames of one streamed reply: role, text in pieces, stop, usage if asked."""
    base = {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": request.model,
    }
    deltas = [{"role": "assistant", "content": ""}]
    deltas += [{"content": text[i : i + 24]} for i in range(0, len(text), 24)]
    frames = [
        {**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas
    ]
    frames.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    if usage is not None:
        frames.append({**base, "choices": [], "usage": usage})
    return frames


def _whole(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _handler(model: ScriptedModel) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go in separate writes

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._json(200, _MODELS)
            else:
                self._error(404, f"no route GET {self.path}")

        def do_POST(self) -> None:
            model._begin()
            try:
                self._post()
            finally:
                model._end()

        def _post(self) -> None:
            body = self._body()
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._error(404, f"no route POST {self.path}")
                return
            fault = model._arrived()
            if fault is not None and self._apply(fault):
                return
            if model.api_key and self.headers.get("authorization") != f"Bearer {model.api_key}":
                self._error(401, "incorrect API key")
                return
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                self._error(400, "the body must be a JSON object with a 'messages' list")
                return
            refused = [f for f in model.refused_fields if body.get(f) is not None]
            if refused:
                self._error(400, _refusal(refused[0]))
                return
            stream = bool(body.get("stream"))
            request = ModelRequest(
                str(body.get("model", "")), body["messages"], stream,
                _whole(body.get("max_tokens")), _whole(body.get("max_completion_tokens")),
            )  # fmt: skip
            model._record(request)
            if model.latency_s:
                time.sleep(model.latency_s)
            try:
                text = model.policy(request)
            except Exception as e:
                self._error(500, f"the scripted policy failed: {type(e).__name__}: {e}")
                return
            text, finish = _capped(request, text) if model.honour_cap else (text, "stop")
            usage = _usage(request, text) if model.send_usage else None
            ident = f"chatcmpl-scripted-{time.time_ns()}"
            if not stream:
                self._json(200, _completion(ident, request, text, usage, finish))
                return
            if not (body.get("stream_options") or {}).get("include_usage"):
                usage = None
            self._stream(_chunks(ident, request, text, usage, finish))

        def _body(self) -> Any:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                return json.loads(raw or b"{}")
            except ValueError:
                return None

        def _apply(self, fault: Fault) -> bool:
            """Carry out `fault`; True when it took the place of the answer."""
            if fault.delay_s:
                time.sleep(fault.delay_s)
            if fault.drop:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return True
            if fault.status:
                after = fault.retry_after
                headers = {} if after is None else {"Retry-After": f"{after:g}"}
                self._error(fault.status, f"scripted fault {fault.status}", headers)
                return True
            return False

        def _stream(self, frames: list[dict]) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("cache-control", "no-cache")
            self.send_header("connection", "close")
            self.end_headers()
            self.close_connection = True
            for frame in frames:
                self.wfile.write(f"data: {json.dumps(frame)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

        def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
            kind = "rate_limit_error" if status == 429 else "invalid_request_error"
            kind = "server_error" if status >= 500 else kind
            body = {"error": {"message": message, "type": kind, "code": None}}
            self._json(status, body, headers)

        def _json(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

    return Handler


# ----------------------------------------------------------------------------- policies


def repl(code: str, preface: str = "Let me run this.") -> str:
    """A reply holding one ```repl block."""
    return f"{preface}\n```repl\n{code.strip()}\n```"


def set_answer(value: Any, preface: str = "Setting the answer.") -> str:
    """A reply whose one ```repl block sets `answer` to `value` (a Python literal of it)."""
    return repl(f"answer['content'] = {value!r}\nanswer['ready'] = True", preface)


def typed_answers(values: list[Any]) -> Policy:
    """A root that answers with `values` in order, one per turn (the last repeats): a schema's
    right answer, or wrong answers it may then repair when told what is wrong. The schema
    and the repair messages it was sent are in the requests the model recorded."""
    return scripted_replies([set_answer(v) for v in values])


def answer_from_prompt(request: ModelRequest) -> str:
    """The sub-model: finds 'magic number is N' in its prompt and answers N, else NONE."""
    found = re.search(r"magic number is (\d+)", request.last)
    return found.group(1) if found else "NONE"


NEEDLE_PROBE = repl("print(type(context))\nprint(len(context))", "First, a look at the context.")

NEEDLE_SEARCH = repl(
    """
if isinstance(context, str):
    text = context
elif isinstance(context, list):
    text = "\\n".join(map(str, context))
else:
    text = str(context)
size = {size}
chunks = [text[i : i + size] for i in range(0, len(text), size)]
replies = llm_query_batched(
    [
        f"Find the magic number in this text. Reply with just the number or NONE.\\n{chunk}"
        for chunk in chunks
    ]
)
found = [r.strip() for r in replies if r.strip() and r.strip().upper() != "NONE"]
print(f"{len(chunks)} chunks searched; found: {found}")
if found:
    answer["content"] = found[0]
    answer["ready"] = True
""",
    "I will search the context chunk by chunk with the sub-model.",
)
_ADVISED_CHUNK = re.compile(r"chunks of at most ([\d,]+) characters")


def advised_chunk_chars(request: ModelRequest, default: int = 100_000) -> int:
    """The chunk size the root's system prompt advises (as a model that follows it would)."""
    found = _ADVISED_CHUNK.search(_text(request.messages[0])) if request.messages else None
    return int(found.group(1).replace(",", "")) if found else default


def needle_policy(request: ModelRequest) -> str:
    """Plays a root RLM that finds 'the magic number is N' in `context`, and its sub-model.

    Root turn 0 probes the context; turn 1 searches it with llm_query_batched over chunks of the
    size the system prompt advises and sets `answer`; any later turn answers FINAL(...) with
    what the search printed.
    """
    if not request.is_root:
        return answer_from_prompt(request)
    if request.turn == 0:
        return NEEDLE_PROBE
    if request.turn == 1:
        return NEEDLE_SEARCH.replace("{size}", f"{advised_chunk_chars(request):_}")
    printed = re.findall(r"found: \[([^\]]*)\]", "\n".join(request.texts("user")))
    first = printed[-1].split(",")[0].strip().strip("'\"") if printed else ""
    return f"The search is done.\nFINAL({first or 'NONE'})"


Reply = str | Policy


def scripted_replies(root_replies: list[Reply], sub_answer: Policy = answer_from_prompt) -> Policy:
    """Root turns get `root_replies` in order (the last one repeats); sub-calls `sub_answer`.

    A reply may be a callable of the request, for a turn that depends on what came back.
    """
    if not root_replies:
        raise ValueError("scripted_replies needs at least one root reply")

    def policy(request: ModelRequest) -> str:
        if not request.is_root:
            return sub_answer(request)
        reply = root_replies[min(request.turn, len(root_replies) - 1)]
        return reply(request) if callable(reply) else reply

    return policy


# ------------------------------------------------------------------ how small models fail


def _root_only(root: Policy) -> Policy:
    def policy(request: ModelRequest) -> str:
        return root(request) if request.is_root else answer_from_prompt(request)

    policy.__doc__ = root.__doc__
    return policy


def _asked_for_the_final_answer(request: ModelRequest) -> bool:
    return "You have no turns left" in request.last


@_root_only
def never_answers(request: ModelRequest) -> str:
    """Explores every turn and, asked for the final answer, writes code and prose, no FINAL."""
    if _asked_for_the_final_answer(request):
        return repl("print(context[:50])", "I need to look a bit more before I can answer.")
    return repl(f"print(len(context), {request.turn})", "Let me look at the context.")


@_root_only
def loops_on_a_broken_cell(request: ModelRequest) -> str:
    """Sends the same failing cell every turn, the final request too, as small models do."""
    return repl("print(total_count)", "Let me print the total.")


@_root_only
def rebinds_context(request: ModelRequest) -> str:
    """Turn 0 rebinds `context` to a list of words; turn 1 answers with what `context` is then."""
    if request.turn == 0:
        return repl("context = context.split()\nprint(len(context))")
    return repl(
        "answer['content'] = f'{type(context).__name__} of {len(context)}'\nanswer['ready'] = True"
    )


@_root_only
def answers_on_its_last_turn(request: ModelRequest) -> str:
    """Explores until a turn's message says it is the last, then answers with the context's
    length; asked in the final request instead, it replies in prose without FINAL."""
    if "This is your last turn" in request.last:
        return repl("answer['content'] = str(len(context))\nanswer['ready'] = True", "Finishing.")
    if _asked_for_the_final_answer(request):
        return "I was still exploring the context and have no answer yet."
    return repl(f"print(context[:{10 + request.turn}])", "Exploring.")


SCENARIOS: dict[str, Policy] = {
    "needle": needle_policy,
    "never-answers": never_answers,
    "loops": loops_on_a_broken_cell,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A scripted OpenAI-compatible stand-in model.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="needle")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per reply")
    args = parser.parse_args(argv)
    model = ScriptedModel(SCENARIOS[args.scenario], args.latency, args.host, args.port).start()
    print(
        f"scripted stand-in model (scenario {args.scenario!r}, not a language model) "
        f"at {model.base_url}",
        flush=True,
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        model.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

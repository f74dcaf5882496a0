"""An OpenAI-compatible facade: any OpenAI client can call an RLM as if it were a model.

- The last user message is the query. The REPL's `context` is the list of the messages before
  it, each the JSON object the caller sent (`{"role": ..., "content": ...}`, content parts and
  other fields as they came).
- The model name `rlm` (or `rlm:<model>`) picks the configured root model (or `<model>`); any
  other name is used as the root model itself.
- Fields of ours (the OpenAI client's `extra_body`): the budgets `max_budget_usd`,
  `max_total_tokens` (the run's `max_tokens`: OpenAI's own `max_tokens` and
  `max_completion_tokens` bound one model reply, and are not applied to a run),
  `max_timeout_s`, `max_iterations`, `max_errors`, and `sub_model`, `max_depth`, `trajectory`.
- `response_format` `{"type": "json_schema", "json_schema": {"schema": ...}}` asks for a typed
  answer (`json_object` for any JSON object): the content is then the value as JSON.
- What is ours in a response is under the key `rlm` (the run's id, outcome, cost, the parsed
  value, the trajectory when asked). A streamed response sends its first chunk at once, then one
  chunk per progress event with empty content and the event under `rlm` (OpenAI clients read
  nothing from it), the answer, and the finish reason with the usage.
- `finish_reason` is "stop" for an answer and "length" for a run stopped by a limit (its
  partial answer is the content, or `[stopped: <reason>]` without one); a failed run is a 502,
  or an error in the stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import Generator, Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from functions.contract import InferRequest, InferResult, total_usage
from functions.errors import RLMError, Unprocessable, UpstreamError


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields we use; the many other OpenAI fields (temperature, ...) are accepted."""

    model_config = ConfigDict(extra="allow")
    model: str = "rlm"
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # extra_body: the run's settings, as /infer names them
    max_budget_usd: float | None = Field(default=None, gt=0)
    max_total_tokens: int | None = Field(default=None, gt=0)
    max_timeout_s: float | None = Field(default=None, gt=0)
    max_iterations: int | None = Field(default=None, ge=1, le=1000)
    max_errors: int | None = Field(default=None, ge=1)
    max_depth: int | None = Field(default=None, ge=0, le=8)
    sub_model: str | None = None
    trajectory: bool = False


def text_of(message: ChatMessage) -> str:
    if isinstance(message.content, list):
        return "".join(str(p.get("text", "")) for p in message.content if isinstance(p, dict))
    return message.content or ""


def to_infer_request(body: ChatRequest) -> InferRequest:
    users = [i for i, m in enumerate(body.messages) if m.role == "user"]
    if not users:
        raise Unprocessable("messages: no user message to answer")
    last = users[-1]
    query = text_of(body.messages[last])
    if not query.strip():
        raise Unprocessable("messages: the last user message is empty")
    earlier = [m.model_dump(exclude_none=True) for m in body.messages[:last]]
    model: str | None = body.model
    if model == "rlm":
        model = None
    elif model.startswith("rlm:"):
        model = model[4:] or None
    return InferRequest(
        query=query,
        context=earlier,
        model=model,
        output_schema=_output_schema(body.response_format),
        max_budget_usd=body.max_budget_usd,
        max_tokens=body.max_total_tokens,
        max_timeout_s=body.max_timeout_s,
        max_iterations=body.max_iterations,
        max_errors=body.max_errors,
        max_depth=body.max_depth,
        sub_model=body.sub_model,
        trajectory=body.trajectory,
    )


def _output_schema(response_format: ResponseFormat | None) -> dict[str, Any] | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    if response_format.json_schema is None:
        raise Unprocessable(
            'response_format: type json_schema needs "json_schema": {"name", "schema"}'
        )
    return response_format.json_schema.schema_


# ----------------------------------------------------------------------------- answers


def completion(body: ChatRequest, result: InferResult) -> dict[str, Any]:
    """The `chat.completion` body of a finished run; `UpstreamError` for a failed one."""
    if result.status == "failed":
        raise UpstreamError(f"the RLM run failed: {result.error}")
    return {
        "id": f"chatcmpl-{result.run_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": _content(result)},
                "finish_reason": _finish_reason(result),
            }
        ],
        "usage": _usage(result),
        "rlm": _ours(body, result),
    }


class Chunks:
    """The chunks of one streamed completion, as server-sent event frames."""

    def __init__(self, body: ChatRequest, run_id: str) -> None:
        self.body = body
        self.ident = f"chatcmpl-{run_id}"
        self.created = int(time.time())

    def first(self) -> str:
        return self._frame({"role": "assistant", "content": ""}, None)

    def progress(self, kind: str, data: dict[str, Any]) -> str:
        return self._frame({"content": ""}, None, {"rlm": {"event": kind, **data}})

    def last(self, result: InferResult) -> Iterator[str]:
        """The answer, the finish reason (with the usage, or the usage on a chunk of its own
        when the client asked for it as OpenAI sends it), then the end."""
        if result.status == "failed":
            yield self.error(UpstreamError(f"the RLM run failed: {result.error}"))
            return
        yield self._frame({"content": _content(result)}, None)
        extra: dict[str, Any] = {"rlm": _ours(self.body, result)}
        separate = bool(self.body.stream_options and self.body.stream_options.include_usage)
        if not separate:
            extra["usage"] = _usage(result)
        yield self._frame({}, _finish_reason(result), extra)
        if separate:
            yield self._data({**self._head(), "choices": [], "usage": _usage(result)})
        yield "data: [DONE]\n\n"

    def error(self, problem: RLMError) -> str:
        """An error after the stream began, as OpenAI streams one (its clients raise it)."""
        return self._data(problem_body(problem)) + "data: [DONE]\n\n"

    def _frame(self, delta: dict[str, Any], reason: str | None, extra: dict | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": reason}
        return self._data({**self._head(), "choices": [choice], **(extra or {})})

    def _head(self) -> dict[str, Any]:
        return {"id": self.ident, "object": "chat.completion.chunk", "created": self.created,
                "model": self.body.model}  # fmt: skip

    @staticmethod
    def _data(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload, default=str)}\n\n"


def stream(
    body: ChatRequest, run_id: str, updates: Generator[tuple[str, Any], None, None]
) -> Iterator[str]:
    """The frames of a streamed completion from a run's updates (see `main._updates`): the
    first chunk as soon as the run is started, a chunk per progress event, a comment while
    nothing happens, then the answer. However it ends, `updates` is closed: a client gone
    after the first chunk stops its run."""
    chunks = Chunks(body, run_id)
    try:
        next(updates)  # the run is on its way
        yield chunks.first()
        for kind, data in updates:
            if kind == "idle":
                yield ": keep-alive\n\n"
            elif kind == "result":
                yield from chunks.last(data)
                return
            elif kind == "error":
                yield chunks.error(data)
                return
            elif kind in PROGRESS:
                yield chunks.progress(kind, data)
    finally:
        updates.close()


# The events a streamed completion forwards: where the run is, never the model's own text.
PROGRESS = frozenset({"run", "turn", "code", "output", "usage", "subcalls", "schema_mismatch"})


def problem_body(problem: RLMError) -> dict[str, Any]:
    """An error as OpenAI's API words one: its clients raise it with this message."""
    kind = "invalid_request_error" if problem.status < 500 else "server_error"
    error = {"message": problem.message, "type": kind, "param": None, "code": problem.status}
    if problem.detail is not None:
        error["detail"] = problem.detail
    return {"error": error}


def _content(result: InferResult) -> str:
    """The answer; for a stopped run its partial answer, or why it stopped when it has none."""
    if result.answer is None and result.status == "stopped":
        return f"[stopped: {result.stop_reason}]"
    return result.answer or ""


def _finish_reason(result: InferResult) -> str:
    return "stop" if result.status == "completed" else "length"


def _usage(result: InferResult) -> dict[str, int]:
    total = total_usage(result.usage)
    return {
        "prompt_tokens": total.input_tokens,
        "completion_tokens": total.output_tokens,
        "total_tokens": total.input_tokens + total.output_tokens,
    }


def _ours(body: ChatRequest, result: InferResult) -> dict[str, Any]:
    ours = result.model_dump(
        mode="json",
        include={"run_id", "status", "stop_code", "stop_reason", "value", "total_cost_usd",
                 "iterations", "execution_time"},
    )  # fmt: skip
    if body.trajectory:
        ours["trajectory"] = result.trajectory
    return ours

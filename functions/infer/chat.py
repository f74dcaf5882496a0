"""An OpenAI-compatible facade: any OpenAI client can call an RLM as if it were a model.

The last user message is the query; the content before it is the context. The model name
`rlm` (or `rlm:<model>`) picks the configured root model (or `<model>`); any other name is
used as the root model itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response
from pydantic import BaseModel, ConfigDict, Field

from functions.contract import InferRequest, InferResult
from functions.errors import Unprocessable, UpstreamError
from functions.http import json_response


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    """The fields we use; the many other OpenAI fields (temperature, ...) are accepted."""

    model_config = ConfigDict(extra="allow")
    model: str = "rlm"
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False


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
    earlier = [f"[{m.role}]\n{text_of(m)}" for m in body.messages[:last]]
    model = body.model
    if model == "rlm":
        model = None
    elif model.startswith("rlm:"):
        model = model[4:] or None
    return InferRequest(query=query, context="\n\n".join(earlier), model=model)


def respond(body: ChatRequest, run: Callable[[InferRequest], InferResult]) -> Response:
    result = run(to_infer_request(body))
    if result.status == "failed":
        raise UpstreamError(f"the RLM run failed: {result.error}")
    content = result.answer or f"[stopped: {result.stop_reason}]"
    created = int(time.time())
    ident = f"chatcmpl-{result.run_id}"
    input_tokens = sum(u.input_tokens for u in result.usage.values())
    output_tokens = sum(u.output_tokens for u in result.usage.values())
    usage = {
        "prompt_tokens": input_tokens,
        "completion_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }
    finish = "stop" if result.status == "completed" else "length"
    if not body.stream:
        return json_response(
            {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": finish,
                    }
                ],
                "usage": usage,
            }
        )

    def chunk(delta: dict[str, Any], reason: str | None, extra: dict | None = None) -> str:
        data = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
            **(extra or {}),
        }
        return f"data: {json.dumps(data)}\n\n"

    def frames() -> Iterator[str]:
        yield chunk({"role": "assistant", "content": ""}, None)
        yield chunk({"content": content}, None)
        yield chunk({}, finish, {"usage": usage})
        yield "data: [DONE]\n\n"

    return Response(frames(), mimetype="text/event-stream")

"""The contract between the planes (v1): every JSON body either plane sends or receives, and
the two that carry large values as bytes after a JSON header.

Field names here are the contract. Add fields freely; never rename these.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from functions.errors import StopCode

SHA256_PATTERN = r"^[0-9a-f]{64}$"
# A cell's owner on the execute plane: random, so no one else can name it.
SCOPE_PATTERN = r"^[A-Za-z0-9_-]{16,128}$"


def new_scope() -> str:
    """A fresh scope: 128 random bits."""
    return secrets.token_urlsafe(16)


class Strict(BaseModel):
    """A request body: unknown fields are an error the caller sees, not something ignored."""

    model_config = ConfigDict(extra="forbid")


class Open(BaseModel):
    """A response body: readers ignore fields they do not know."""

    model_config = ConfigDict(extra="allow")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def context_bytes(value: Any) -> bytes:
    """The canonical bytes of an RLM context: text as UTF-8, anything else as compact JSON."""
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def has_lone_surrogate(raw: bytes, value: Any) -> bool:
    """Whether `value`, decoded from the JSON text `raw`, holds a lone UTF-16 surrogate (a
    `\\udXXX` escape without its pair): valid JSON, but no UTF-8 text, so no context or code."""
    if not _SURROGATE_ESCAPE.search(raw):
        return False  # the common case, without a second pass over the value
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def context_ref(value: Any) -> str:
    """The reference both planes compute for a context value."""
    return sha256_hex(context_bytes(value))


# ----------------------------------------------------------------------------- usage


class ModelUsage(Open):
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, other: ModelUsage) -> None:
        self.calls += other.calls
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cost_usd += other.cost_usd


UsageByModel = dict[str, ModelUsage]


def total_usage(usage: UsageByModel) -> ModelUsage:
    total = ModelUsage()
    for one in usage.values():
        total.add(one)
    return total


def merge_usage(into: UsageByModel, other: UsageByModel) -> UsageByModel:
    for model, usage in other.items():
        into.setdefault(model, ModelUsage()).add(usage)
    return into


# ----------------------------------------------------------------------------- bytes

# A body too large to escape and parse as JSON travels as bytes: a JSON header (the request, its
# large values replaced by their lengths in bytes), a newline, then those values' bytes in the
# order the header names them. Nothing on the way decodes, escapes or parses them but the
# plane that uses them, once.
SUBCALL_BYTES_TYPE = "application/vnd.rlm.subcall+bytes"  # prompts: SubcallRequest.prompt_bytes
EXECUTE_BYTES_TYPE = "application/vnd.rlm.execute+bytes"  # contexts: ContextRef.data_bytes


def framed(header: dict[str, Any], parts: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """The body, in pieces (the parts are not copied): the header's line, then the parts."""
    return [json.dumps(header, separators=(",", ":")).encode() + b"\n", *parts]


def unframed(body: bytes, media_type: str) -> tuple[bytes, memoryview]:
    """(the header's JSON, the bytes after it, not copied); `ValueError` without a header."""
    end = body.find(b"\n")
    if end < 0:
        raise ValueError(f"a {media_type} body is a JSON object, a newline, then bytes")
    return body[:end], memoryview(body)[end + 1 :]


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


# ----------------------------------------------------------------------------- execute


class StateRef(Strict):
    """The REPL state by reference: `ref` is the sha256 of the pickled namespace; `data`, sent
    when the pod lacks it, is that pickle zlib-compressed and base64-encoded."""

    ref: str = Field(pattern=SHA256_PATTERN)
    data: str | None = None


class ContextRef(Strict):
    """The value bound to `context` in the guest: by reference, with data on first transfer."""

    ref: str = Field(pattern=SHA256_PATTERN)
    data: Any = None


class CellContext(ContextRef):
    """A context as a cell request carries it: by reference, with data, or with its bytes."""

    data_bytes: int | None = Field(
        default=None,
        ge=0,
        description=f"Sent as {EXECUTE_BYTES_TYPE} instead of data: the length of the context's "
        "canonical bytes (what its ref hashes), which follow the JSON header in the order of "
        "rlm_context, then rlm_contexts.",
    )
    data_kind: Literal["text", "json"] | None = Field(
        default=None, description="With data_bytes: UTF-8 text, or compact sorted-key JSON."
    )


class Limits(Strict):
    """Per-cell limits a caller may ask for; the execute plane caps each at its own maximum."""

    deadline_s: float | None = Field(default=None, gt=0)
    fuel: int | None = Field(default=None, gt=0)
    memory_bytes: int | None = Field(default=None, gt=0)
    output_bytes: int | None = Field(default=None, gt=0)
    max_subcalls: int | None = Field(default=None, ge=0)


class ToolSpec(Strict):
    """A caller's tool: an HTTP endpoint infer POSTs the arguments to (`url`), or a function of
    the embedding process (`ref`, set by the SDK). The guest calls it by its name."""

    description: str = Field(default="", max_length=4000)
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object"},
        description="JSON Schema of the arguments (an object); infer checks calls against it.",
    )
    url: str | None = Field(default=None, pattern=r"^https?://")
    timeout_s: float = Field(default=30.0, gt=0, le=600)
    signature: str | None = Field(default=None, max_length=1000)
    ref: str | None = Field(default=None, max_length=200)


ToolName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$")]
ToolCatalog = dict[ToolName, ToolSpec]


class Callback(Strict):
    """Where the guest's sub-calls go: an infer endpoint and the bearer token for this cell."""

    url: str = Field(pattern=r"^https?://")
    token: str = Field(min_length=1)
    tools: ToolCatalog = Field(default_factory=dict, description="Tools this cell may call.")
    sub_tools: ToolCatalog = Field(default_factory=dict, description="Tools of child RLMs.")


class ExecuteRequest(Strict):
    code: str
    context: dict[str, Any] = Field(
        default_factory=dict, description="Variables bound in the guest before the code runs."
    )
    timeout: float | None = Field(default=None, gt=0, description="Seconds; same as deadline_s.")
    session_id: str | None = Field(default=None, min_length=1, max_length=256)
    state: StateRef | None = None
    rlm_context: CellContext | None = None
    limits: Limits = Field(default_factory=Limits)
    callback: Callback | None = None
    return_state: bool = Field(default=False, description="Always include state.data.")
    rlm_contexts: list[CellContext] | None = Field(
        default=None,
        description="A conversation's contexts, oldest first, bound to context_0, context_1, ...; "
        "one whose ref equals rlm_context's is that same value, sent once.",
    )
    scope: str | None = Field(
        default=None,
        pattern=SCOPE_PATTERN,
        description="The owner of this cell's session and of the state and contexts it sends: "
        "a random value the caller keeps secret and sends with every cell of a run. A session "
        "id or a ref reaches only what cells of the same scope made or sent. Absent: the pod "
        "makes one and returns it.",
    )


class ErrorInfo(Open):
    type: str
    message: str
    traceback: str = ""


class LocalInfo(Open):
    type: str
    preview: str


class Answer(Open):
    ready: bool = False
    content: str | None = None


class StateOut(Open):
    ref: str
    data: str | None = None
    size: int = 0
    live_only: bool = Field(
        default=False,
        description="Held only by this pod's live interpreter, never pickled (it is larger than "
        "EXECUTE_STATE_INLINE_BYTES): another pod rebuilds it by replaying the session's cells.",
    )


class SubcallSummary(Open):
    count: int = 0
    usage: UsageByModel = Field(default_factory=dict)


class ExecuteResponse(Open):
    stdout: str = ""
    stderr: str = ""
    error: ErrorInfo | None = None
    state: StateOut | None = None
    locals: dict[str, LocalInfo] = Field(default_factory=dict)
    answer: Answer | None = None
    execution_time: float = 0.0
    subcalls: SubcallSummary = Field(default_factory=SubcallSummary)
    trapped: str | None = None
    session_reset: bool = Field(
        default=False,
        description="A limit or a failed cell ended the live interpreter; state is the last "
        "good one.",
    )
    scope: str | None = Field(default=None, description="The scope the cell ran in.")


class Missing(Open):
    """409 body: refs this pod does not hold; the caller re-sends them with data."""

    missing: list[Literal["state", "rlm_context", "rlm_contexts"]]
    error: str = ""


class Problem(Open):
    """Every 4xx/5xx body: what went wrong and what to do about it."""

    error: str
    detail: Any = None


# ----------------------------------------------------------------------------- sub-calls


@dataclass(frozen=True)
class PromptBatch:
    """Prompts as one run of UTF-8, and each prompt's length in it."""

    data: bytes | memoryview
    lengths: list[int]

    def problem(self) -> str | None:
        """What is wrong with the batch's shape, or None."""
        if not self.lengths:
            return "the batch holds no prompts"
        if any(type(n) is not int or n < 0 for n in self.lengths):
            return "prompt_bytes must be lengths in bytes (integers, 0 or more)"
        if sum(self.lengths) != len(self.data):
            return f"prompt_bytes add up to {sum(self.lengths):,}; {len(self.data):,} bytes came"
        return None

    def prompts(self) -> list[str]:
        """The prompts; `ValueError` naming the first that is not UTF-8 text."""
        out, at, view = [], 0, memoryview(self.data)
        for index, length in enumerate(self.lengths):
            try:
                out.append(str(view[at : at + length], "utf-8"))
            except UnicodeDecodeError:
                raise ValueError(f"prompt {index} of the batch is not UTF-8 text") from None
            at += length
        return out


class SubcallRequest(Strict):
    kind: Literal["llm", "rlm", "tool"]
    prompts: list[str] = Field(default_factory=list)
    prompt_bytes: list[int] | None = Field(
        default=None,
        description=f"Sent as {SUBCALL_BYTES_TYPE}: each prompt's length in bytes, the prompts "
        "following this JSON object and a newline as UTF-8, one after another.",
    )
    model: str | None = None
    tool: str | None = Field(default=None, description="kind tool: the tool's name.")
    arguments: dict[str, Any] | None = Field(default=None, description='{"args", "kwargs"}')
    tools: ToolCatalog = Field(
        default_factory=dict, description="kind tool: its spec; kind rlm: the children's tools."
    )

    @model_validator(mode="after")
    def _shape(self) -> SubcallRequest:
        if self.kind == "tool" and not self.tool:
            raise ValueError("a tool call names its tool")
        if self.kind != "tool" and not (self.prompts or self.prompt_bytes):
            raise ValueError("prompts must not be empty")
        return self


class SubcallResponse(Open):
    responses: list[str]
    usage: UsageByModel = Field(default_factory=dict)
    result: Any = None  # a tool call's JSON result
    error: str | None = None  # a tool call that failed: the message the guest's exception has
    cancelled: bool = False  # the run was cancelled: the cell stops


# ----------------------------------------------------------------------------- infer


class Conversation(Strict):
    """A conversation as its caller carries it, to continue it on an infer process that does
    not hold it: the state after its last turn and every turn's context."""

    id: str = Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")
    state: StateRef | None = None
    contexts: list[ContextRef] = Field(default_factory=list)
    signature: str | None = Field(
        default=None, max_length=128, description="Infer's signature: send the record as it came."
    )


class InferRequest(Strict):
    query: str = Field(min_length=1, max_length=1_000_000)
    context: Any = None
    context_uri: str | None = Field(default=None, pattern=r"^(https?|file)://")
    model: str | None = None
    sub_model: str | None = None
    max_depth: int | None = Field(default=None, ge=0, le=8)
    max_iterations: int | None = Field(default=None, ge=1, le=1000)
    max_budget_usd: float | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)
    max_timeout_s: float | None = Field(default=None, gt=0)
    max_errors: int | None = Field(default=None, ge=1)
    trajectory: bool = False
    root_prompt: str | None = Field(default=None, description="A short hint shown to the root.")
    persistent: bool = Field(
        default=False,
        description="Start a conversation: later requests with the returned conversation_id "
        "continue it (same REPL state; context_0, context_1, ... and history_0, ...).",
    )
    conversation_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]{8,64}$",
        description="Continue this conversation (from an earlier result on this infer process).",
    )
    conversation: Conversation | None = Field(
        default=None,
        description="The conversation_id's record from its last result, each context with its "
        "data: an infer process that does not hold the conversation continues it from this.",
    )
    compaction: bool = Field(
        default=False,
        description="Summarize the root conversation when it nears the model's context window; "
        "the full history stays in the REPL as `history`.",
    )
    compaction_threshold: float | None = Field(
        default=None, gt=0, lt=1, description="Fraction of the context window; default setting."
    )
    models: list[str] | None = Field(
        default=None, description="More models the guest may name in model=, besides these."
    )
    models_by_depth: dict[Annotated[int, Field(ge=1, le=8)], str] | None = Field(
        default=None, description="Default model of what runs at depth d >= 1 (sub-calls too)."
    )
    custom_tools: ToolCatalog | None = None
    custom_sub_tools: ToolCatalog | None = Field(
        default=None, description="Tools of child RLMs; null: the same as custom_tools."
    )
    run_id: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Chosen by the caller."
    )
    output_schema: dict[str, Any] | None = Field(
        default=None,
        description="A JSON Schema the answer must match: the model sets the answer as a value, "
        "infer checks it (one repair turn on a mismatch, then a stop with code output_schema) "
        "and the result carries it parsed in `value`.",
    )

    @field_validator("models_by_depth", mode="before")
    @classmethod
    def _depths_from_json(cls, value: Any) -> Any:
        """JSON object keys are strings: a depth arrives as "1" and means the number 1."""
        if not isinstance(value, dict):
            return value
        return {int(k) if isinstance(k, str) and re.fullmatch(r"[0-9]{1,2}", k) else k: v
                for k, v in value.items()}  # fmt: skip


RunStatus = Literal["completed", "stopped", "failed"]


class InferResult(Open):
    run_id: str
    status: RunStatus
    answer: str | None = None
    stop_code: StopCode | None = Field(
        default=None,
        description="The limit or event that stopped the run, when one did; on a completed "
        "run, max_iterations says its answer came in the final request.",
    )
    stop_reason: str | None = Field(default=None, description="The stop, in words.")
    value: Any = Field(
        default=None,
        description="With output_schema: the answer parsed, matching the schema (`answer` is "
        "its JSON text).",
    )
    error: str | None = None
    usage: UsageByModel = Field(default_factory=dict)
    total_cost_usd: float = 0.0
    total_tokens: int = 0
    iterations: int = 0
    execution_time: float = 0.0
    trajectory: list[dict[str, Any]] | None = None
    conversation_id: str | None = Field(
        default=None, description="Send it back as conversation_id to continue the conversation."
    )
    conversation: Conversation | None = Field(
        default=None,
        description="The state after this turn and the contexts' refs: keep it, to continue "
        "the conversation on an infer process that does not hold it.",
    )


class CancelReply(Open):
    """202 body of POST /infer/{run_id}/cancel: the run stops; its result says "cancelled"."""

    run_id: str
    cancelled: bool = True

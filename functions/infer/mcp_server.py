"""The RLM as tools for agents, over the Model Context Protocol (the official `mcp` SDK).

Served two ways with the same tools: `rlm mcp` (stdio, an embedded RLM, for a local agent's MCP
configuration) and `/mcp` on the infer function (streamable HTTP, see `mcp_http`).

- `ask`: a question about a context given inline (`context` as text, `context_json` as a JSON
  value), as a URL under the operator's INFER_CONTEXT_URL_PREFIXES (`context_url`), or, on the
  local stdio server only, as a file (`context_path`); with the budgets, model settings and
  `output_schema` an /infer request may carry; `persistent` keeps the REPL for more questions.
- `continue_conversation`: another question in a conversation `ask` started.

A call's result is the run's outcome, as structured content (and its JSON as text): the answer
(and `value`, with an output schema), `status` completed or stopped with its `stop_code`, usage
and cost, and the `conversation_id` to continue. While the run goes, progress notifications say
its turn (`progress`, of `total` turns), its sub-calls answered and asked, and its cost. A call
the client cancels (a cancel notification, or a closed response stream) stops its run.
"""

from __future__ import annotations

import inspect
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field

from functions.contract import InferRequest, InferResult, ModelUsage
from functions.errors import RLMError
from functions.http import validate
from functions.infer.inputs import ContextError, read_file
from functions.infer.ledger import ANONYMOUS
from functions.infer.loop import Emit
from functions.infer.settings import InferSettings

PROGRESS_EVERY_S = 0.25  # how often a run's progress is looked at, and sent when it changed


class RunOutcome(BaseModel):
    """What an `ask` or `continue_conversation` call returns."""

    answer: str | None = Field(description="The answer (with output_schema: its JSON text).")
    value: Any = Field(default=None, description="With output_schema: the answer, parsed.")
    status: Literal["completed", "stopped"] = Field(
        description="completed: answered. stopped: a limit or a cancel ended the run first."
    )
    stop_code: str | None = Field(
        default=None, description="What stopped it: max_iterations, max_budget_usd, "
        "max_tokens, max_timeout_s, max_errors, cancelled, output_schema.",
    )  # fmt: skip
    stop_reason: str | None = None
    run_id: str
    conversation_id: str | None = Field(
        default=None, description="Give it to continue_conversation to ask more."
    )
    usage: dict[str, ModelUsage] = Field(description="Calls, tokens and cost by model.")
    total_cost_usd: float
    total_tokens: int
    iterations: int
    execution_time: float

    @classmethod
    def of(cls, result: InferResult) -> RunOutcome:
        if result.status == "failed":
            raise ToolError(f"the run failed: {result.error}")
        return cls.model_validate(result.model_dump(include=set(cls.model_fields)))


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Param:
    annotation: Any
    description: str
    default: Any = None


PARAMS: dict[str, Param] = {
    "question": Param(str, "The question to answer about the context.", inspect.Parameter.empty),
    "conversation_id": Param(
        str, "The conversation_id an earlier ask (persistent) returned.", inspect.Parameter.empty
    ),
    "context": Param(str, "The context as text: a document, a log, a codebase dump...", ""),
    "context_json": Param(
        list[Any] | dict[str, Any] | None,
        "The context as a JSON value instead of text: a list of documents, a dict...",
    ),
    "context_url": Param(
        str | None,
        "An http(s) URL the server fetches the context from (only under the URL prefixes its "
        "operator allows).",
    ),
    "context_path": Param(str | None, "A file on this machine to read the context from."),
    "output_schema": Param(
        dict[str, Any] | None,
        "A JSON Schema the answer must match: the result's value is then the answer parsed.",
    ),
    "persistent": Param(
        bool, "Keep the REPL after this question: continue_conversation asks more.", False
    ),
    "model": Param(str | None, "The root model (default: the server's)."),
    "sub_model": Param(str | None, "The model of the sub-calls on chunks (default: the server's)."),
    "max_depth": Param(int | None, "How deep RLMs may call child RLMs (at most the server's)."),
    "max_iterations": Param(int | None, "The most turns of the root model."),
    "max_budget_usd": Param(float | None, "Stop the run once it has cost this much (USD)."),
    "max_tokens": Param(int | None, "Stop the run once it has used this many tokens in all."),
    "max_timeout_s": Param(float | None, "Stop the run after this many seconds."),
    "max_errors": Param(int | None, "Stop the run after this many failing cells in a row."),
}
CONTEXT = ["context", "context_json", "context_url", "context_path"]
SETTINGS = ["output_schema", "model", "sub_model", "max_depth", "max_iterations",
            "max_budget_usd", "max_tokens", "max_timeout_s", "max_errors"]  # fmt: skip
TOOLS = {
    "ask": (
        ["question", *CONTEXT, "persistent", *SETTINGS],
        "Answer a question about a context far too large to read at once (megabytes: "
        "documents, logs, code) with a Recursive Language Model: a model that explores the "
        "context with Python in a sandbox and asks sub-models about its parts. Give the "
        "context one way: context (text), context_json, context_url or context_path. With "
        "output_schema the answer is a value matching it.",
    ),
    "continue_conversation": (
        ["conversation_id", "question", *CONTEXT, *SETTINGS],
        "Ask another question in a conversation an earlier ask started with persistent=true: "
        "the REPL still holds its variables and contexts (context_0, context_1, ...). A "
        "context given here is the new question's.",
    ),
}


# ----------------------------------------------------------------------------- the server


# (request, emit, cancelled, caller): the caller as the surface's `who` gives it
Runner = Callable[[InferRequest, Emit, Callable[[], bool], Any], InferResult]


def _nobody(ctx: Context) -> tuple[Any, Callable[[], bool]]:
    return ANONYMOUS, lambda: False


@dataclass
class Surface:
    """What the stdio and HTTP servers do differently.

    `run(request, emit, cancelled, caller)` runs a request whose context is inline or a
    `context_uri` (it loads that under the operator's prefixes, within their ceilings);
    `stop(run_id, caller)` stops one; `who(ctx)` is the caller of a tool call (the owner of
    its run, as the surface knows callers) and whether its client has hung up;
    `file_roots` the folders a `context_path` may be in (none: no `context_path`).
    """

    run: Runner
    stop: Callable[[str, Any], None]
    settings: InferSettings
    file_roots: tuple[Path, ...] = ()
    who: Callable[[Context], tuple[Any, Callable[[], bool]]] = _nobody
    name: str = "rlm"
    limiter: anyio.CapacityLimiter = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Each run holds a thread; infer refuses runs past its own bound (INFER_MAX_RUNS), so
        # this only keeps calls from queueing behind anyio's default limit instead.
        self.limiter = anyio.CapacityLimiter(self.settings.max_runs + 4)


def build_server(surface: Surface) -> MCPServer:
    """An MCP server with the RLM tools, for `surface`."""
    server = MCPServer(
        surface.name,
        log_level="WARNING",  # the SDK sets up logging when none is: its own lines, not httpx's
        instructions="Recursive Language Model tools: ask questions of contexts far larger than "
        "a model's window; each call runs an RLM to its answer, with progress as it goes.",
    )
    for name, (names, description) in TOOLS.items():
        if not surface.file_roots:
            names = [n for n in names if n != "context_path"]
            description = description.replace(" or context_path", "").replace(
                "context_json, context_url", "context_json or context_url"
            )
        server.add_tool(_tool(surface, name, names), name=name, description=description)
    return server


def _tool(surface: Surface, name: str, names: list[str]) -> Callable[..., Any]:
    """The tool's function, its signature built from `PARAMS` (the SDK derives the input
    schema from it)."""

    async def call(ctx: Context, **arguments: Any) -> RunOutcome:
        _refuse_unknown(ctx, names)
        return await _call(surface, ctx, arguments)

    parameters = [
        inspect.Parameter(
            n,
            inspect.Parameter.KEYWORD_ONLY,
            default=PARAMS[n].default,
            annotation=Annotated[PARAMS[n].annotation, Field(description=PARAMS[n].description)],
        )
        for n in names
    ]
    parameters.append(inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=Context))
    call.__signature__ = inspect.Signature(parameters, return_annotation=RunOutcome)  # type: ignore[attr-defined]
    call.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": RunOutcome}
    call.__name__ = call.__qualname__ = name
    return call


def _refuse_unknown(ctx: Context, names: list[str]) -> None:
    """An argument the tool does not take is an error, not something ignored (a misspelled
    budget would otherwise not bound the run)."""
    params = ctx.request_context.params or {}
    sent = params.get("arguments") or {}
    unknown = sorted(set(sent) - set(names)) if isinstance(sent, dict) else []
    if unknown:
        raise ToolError(
            f"unknown argument {', '.join(map(repr, unknown))}: this tool takes {', '.join(names)}"
        )


async def _call(surface: Surface, ctx: Context, arguments: dict[str, Any]) -> RunOutcome:
    caller, hung_up = surface.who(ctx)
    request = _request(surface, arguments)
    run_id = request.run_id or ""
    progress = _Progress(request.max_iterations or surface.settings.max_iterations)
    abandoned = threading.Event()  # the call was cancelled, perhaps before the run began

    def work() -> InferResult:
        return surface.run(request, progress, lambda: abandoned.is_set() or hung_up(), caller)

    ended: list[InferResult | RLMError] = []
    try:
        async with anyio.create_task_group() as forwarding:
            forwarding.start_soon(_forward, progress, ctx)
            forwarding.start_soon(_watch, hung_up, lambda: surface.stop(run_id, caller))
            try:
                ended.append(await anyio.to_thread.run_sync(
                    work, abandon_on_cancel=True, limiter=surface.limiter
                ))  # fmt: skip
            except RLMError as problem:
                ended.append(problem)
            finally:
                forwarding.cancel_scope.cancel()
    except anyio.get_cancelled_exc_class():
        abandoned.set()  # the client cancelled: so is the run
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(surface.stop, run_id, caller)
        raise
    last = progress.take()  # what happened since the last look
    if last is not None:
        await ctx.report_progress(*last)
    if isinstance(ended[0], RLMError):
        raise ToolError(ended[0].message)
    return RunOutcome.of(ended[0])


def _request(surface: Surface, arguments: dict[str, Any]) -> InferRequest:
    """The /infer request of a tool call; `ToolError` with what to fix for a bad one."""
    given = [n for n in CONTEXT if arguments.get(n) not in (None, "")]
    if len(given) > 1:
        raise ToolError(f"give the context one way, not {' and '.join(given)}")
    fields = {k: v for k, v in arguments.items() if k not in CONTEXT and v is not None}
    fields["query"] = fields.pop("question")
    fields["run_id"] = uuid.uuid4().hex[:16]
    source = given[0] if given else None
    if source == "context_url":
        fields["context_uri"] = arguments["context_url"]
    elif source == "context_path":
        fields["context"] = _read(
            arguments["context_path"], surface.file_roots, surface.settings.max_context_bytes
        )
    elif source is not None:
        fields["context"] = arguments[source]
    try:
        return validate(InferRequest, fields)
    except RLMError as problem:
        raise ToolError(problem.message) from None


def _read(path: str, roots: tuple[Path, ...], max_bytes: int) -> Any:
    """A file under one of `roots` (links followed first: a link cannot lead out of them)."""
    resolved = Path(path).expanduser().resolve()
    if not any(resolved.is_relative_to(root) for root in roots):
        shown = ", ".join(map(str, roots))
        raise ToolError(
            f"context_path {path} is not under {shown}: this server reads files only there "
            "(RLM_MCP_FILE_ROOTS)"
        )
    try:
        return read_file(resolved, max_bytes)
    except ContextError as e:
        raise ToolError(e.message) from None


class _Progress:
    """A run's events, kept as what its progress notifications say (called from its thread)."""

    def __init__(self, turns: int) -> None:
        self.turns = turns
        self._lock = threading.Lock()
        self._turn = self._done = self._asked = 0
        self._cost = 0.0
        self._changed = False
        self._sent = 0.0

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        with self._lock:
            if kind == "turn" and data.get("depth", 0) == 0:
                self._turn = data.get("iteration", self._turn)
            elif kind == "subcalls":  # a batch starts (at any depth)
                self._asked += data.get("total", 0)
            elif kind == "subcall":  # one of its calls is answered
                self._done += 1
            elif kind == "usage" and data.get("depth", 0) == 0:
                self._cost = sum(u["cost_usd"] for u in data.values() if isinstance(u, dict))
            else:
                return
            self._changed = True

    def take(self) -> tuple[float, float, str] | None:
        """(progress, total, message) if anything changed since the last; `progress` grows
        with every notification, as MCP wants: the turn, plus the share of its sub-calls."""
        with self._lock:
            if not self._changed:
                return None
            self._changed = False
            share = self._done / self._asked if self._asked else 0.0
            self._sent = max(self._turn + 0.99 * share, self._sent + 0.001)
            message = (
                f"turn {self._turn} of {self.turns} · sub-calls {self._done}/{self._asked} "
                f"answered · ${self._cost:.4f}"
            )
            return self._sent, float(self.turns), message


async def _watch(hung_up: Callable[[], bool], stop: Callable[[], None]) -> None:
    """Stop the run once its client has hung up (cancelled when the run ends)."""
    while not hung_up():
        await anyio.sleep(PROGRESS_EVERY_S)
    await anyio.to_thread.run_sync(stop)


async def _forward(progress: _Progress, ctx: Context) -> None:
    """Progress notifications while the run goes (cancelled when it ends)."""
    while True:
        update = progress.take()
        if update is not None:
            await ctx.report_progress(*update)
        await anyio.sleep(PROGRESS_EVERY_S)


# ----------------------------------------------------------------------------- stdio


def serve_stdio() -> int:
    """`rlm mcp`: the tools over stdio, on an embedded RLM configured from the environment
    (LLM_BASE_URL, LLM_MODEL, LLM_API_KEY, and the infer settings). A `context_path` must be
    under RLM_MCP_FILE_ROOTS, by default the folder it started in (an agent's project)."""
    from functions import logs
    from functions.config import env_int
    from functions.infer.inputs import load_context
    from functions.sdk import RLM

    logs.setup()  # stderr: stdout carries the protocol
    rlm = RLM(max_iterations=env_int("MAX_ITERATIONS", 30, 1, os.environ))  # the operator's
    service, settings = rlm.service, rlm.settings

    def run(request: InferRequest, emit: Emit, cancelled: Callable[[], bool], caller: str):
        context = load_context(
            request.context, request.context_uri, settings.max_context_bytes, service.context_urls
        )
        if request.max_depth is None:
            request = request.model_copy(update={"max_depth": settings.max_depth})
        return service.run(request, context, emit, cancelled=cancelled, caller=caller)

    roots = tuple(Path(r).expanduser().resolve() for r in settings.mcp_file_roots or ["."])
    surface = Surface(run=run, stop=service.stop, settings=settings, file_roots=roots)
    try:
        anyio.run(build_server(surface).run_stdio_async)
    finally:
        rlm.close()
    return 0

"""The infer plane's work, without HTTP: runs, sub-calls and child runs, wired together.

The HTTP function (`main.py`) and the embedded SDK both drive an `InferService`; the loop is
never written twice.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from functions.contract import (
    Callback,
    InferRequest,
    InferResult,
    SubcallRequest,
    SubcallResponse,
    UsageByModel,
    merge_usage,
)
from functions.errors import TooManyRequests, Unprocessable
from functions.infer import routing, tokens, tools
from functions.infer.compaction import context_window
from functions.infer.conversations import ConversationStore
from functions.infer.executor import Executor
from functions.infer.loop import Emit, Run, RunConfig
from functions.infer.settings import InferSettings

_MEMO_RUNS = 256
_TOKEN_SLACK_S = 60.0
LOGGED_CHARS = 4000  # of each sub-call prompt and answer, in the trajectory


class Memo:
    """Sub-call answers a run's cells received, so a replayed cell gets the same ones."""

    def __init__(self) -> None:
        self._answers: dict[tuple, deque[list[str]]] = {}
        self._calls: dict[str, list[dict[str, Any]]] = {}  # by cell nonce, for the trajectory
        self._lock = threading.Lock()

    def log(self, nonce: str, entry: dict[str, Any]) -> None:
        with self._lock:
            self._calls.setdefault(nonce, []).append(entry)

    def take_log(self, nonce: str) -> list[dict[str, Any]]:
        with self._lock:
            return self._calls.pop(nonce, [])

    def record(self, key: tuple, responses: list[str]) -> None:
        with self._lock:
            self._answers.setdefault(key, deque()).append(responses)

    def replay(self, key: tuple) -> list[str] | None:
        with self._lock:
            queue = self._answers.get(key)
            return queue.popleft() if queue else None


class InferService:
    def __init__(
        self,
        settings: InferSettings,
        llm: Any,
        executor: Executor,
        callback_url: str | None = None,
    ) -> None:
        self.settings = settings
        self.llm = llm
        self.executor = executor
        self.callback_url = (callback_url or settings.callback_url).rstrip("/") + "/subcalls"
        self.token_key = settings.token_key or secrets.token_bytes(32)
        self._memos: OrderedDict[str, Memo] = OrderedDict()
        self._memo_lock = threading.Lock()
        self._runs = threading.BoundedSemaphore(settings.max_runs)
        self.sink: Any = None  # a ProgressSink when K_SINK is set
        self.conversations = ConversationStore(
            settings.conversation_ttl_s, settings.conversation_max_bytes, settings.max_conversations
        )
        self.tools = tools.ToolRunner()  # embedded: the SDK registers its functions here
        self._active: dict[str, threading.Event] = {}  # run id -> set when cancelled

    # ----------------------------------------------------------------- runs

    def config_for(self, request: InferRequest) -> RunConfig:
        """The run's configuration; `Unprocessable` for a depth above the deployment's MAX_DEPTH."""
        s = self.settings
        if request.max_depth is not None and request.max_depth > s.max_depth:
            raise Unprocessable(
                f"max_depth {request.max_depth} is above this deployment's MAX_DEPTH "
                f"{s.max_depth}: ask for at most {s.max_depth}"
            )
        return RunConfig(
            model=request.model or s.model,
            sub_model=request.sub_model or s.sub_model,
            max_depth=s.max_depth if request.max_depth is None else request.max_depth,
            max_iterations=request.max_iterations or s.max_iterations,
            max_budget_usd=request.max_budget_usd,
            max_tokens=request.max_tokens,
            max_timeout_s=request.max_timeout_s,
            max_errors=request.max_errors,
            output_chars=s.output_chars,
            cell_timeout_s=s.cell_timeout_s,
            root_prompt=request.root_prompt,
            compaction=request.compaction,
            compaction_threshold=request.compaction_threshold or s.compaction_threshold,
            context_window=context_window(request.model or s.model, s.context_windows),
            allowed_models=request.models or [],
            models_by_depth=request.models_by_depth or {},
            tools=request.custom_tools or {},
            sub_tools=_inherit(request.custom_sub_tools, request.custom_tools),
        )

    def run(
        self,
        request: InferRequest,
        context: Any,
        emit: Emit | None = None,
        traceparent: str | None = None,
        cancelled: Callable[[], bool] | None = None,
        run_id: str | None = None,
    ) -> InferResult:
        """One root run. Raises `Busy` when this process already runs its maximum,
        `Unprocessable` for tools it cannot serve or a run id already running, and
        `ConversationError` when the request's conversation cannot take another turn."""
        config = self.config_for(request)
        for catalog in (config.tools, config.sub_tools):
            tools.check_catalog(catalog, self.tools.functions, self.settings.tool_url_prefixes)
        run_id = run_id or request.run_id or uuid.uuid4().hex[:16]
        stop = threading.Event()
        with self._memo_lock:
            if run_id in self._active:
                raise Unprocessable(f"run {run_id!r} is already running")
            self._active[run_id] = stop
        if not self._runs.acquire(timeout=0.5):
            self._active.pop(run_id, None)
            raise Busy(f"this infer process is running its maximum of {self.settings.max_runs}")
        turn = None
        try:
            if request.persistent or request.conversation_id:
                turn = self.conversations.begin(
                    request.conversation_id, context, request.conversation
                )
            run = Run(
                config=config,
                llm=self.llm,
                executor=self.executor,
                grants=self,
                emit=emit,
                traceparent=traceparent,
                turn=turn,
                run_id=run_id,
            )
            run.cancelled = (lambda: stop.is_set() or cancelled()) if cancelled else stop.is_set
            result = run.completion(request.query, context)
            if request.trajectory:
                result.trajectory = run.trajectory
        finally:
            carried = self.conversations.end(turn) if turn is not None else None
            self._runs.release()
            with self._memo_lock:
                self._active.pop(run_id, None)
        if turn is not None:
            result.conversation_id, result.conversation = turn.conversation_id, carried
        return result

    def cancel(self, run_id: str) -> bool:
        """Stop a run of this process: its cells end at their next sub-call; False if unknown."""
        stop = self._active.get(run_id)
        if stop is not None:
            stop.set()
        return stop is not None

    def _stopped(self, run_id: str) -> threading.Event:
        """The cancel flag of a run (or of the root run of a child); a fresh one if unknown."""
        return self._active.get(run_id.split(".")[0]) or threading.Event()

    def grant(self, run: Run, replay: bool) -> Callback:
        remaining = run.config.max_timeout_s
        ttl = (remaining or run.config.cell_timeout_s * run.config.max_iterations) + _TOKEN_SLACK_S
        claims = tokens.TokenClaims(
            run_id=run.run_id,
            depth=run.depth,
            max_depth=run.config.max_depth,
            exp=int(time.time() + ttl),
            models=run.config.models,
            nonce=("replay-" if replay else "") + uuid.uuid4().hex[:12],
            sub_model=run.config.sub_model,
            by_depth={str(d): m for d, m in run.config.models_by_depth.items()},
            tools={name: tools.digest(spec) for name, spec in run.config.tools.items()},
            sub_tools=tools.catalog_digest(run.config.sub_tools),
        )
        return Callback(
            url=self.callback_url,
            token=tokens.mint(self.token_key, claims),
            tools=run.config.tools,
            sub_tools=run.config.sub_tools,
        )

    def served(self, callback: Callback) -> list[dict[str, Any]]:
        claims = tokens.verify(self.token_key, callback.token, check_expiry=False)
        return self._memo(claims.run_id).take_log(claims.nonce)

    # ----------------------------------------------------------------- sub-calls

    def subcall(self, token: str, request: SubcallRequest) -> SubcallResponse:
        """Serve the guest's sub-call. Raises `tokens.TokenError` (401/403) before any cost."""
        claims = tokens.verify(self.token_key, token)
        by_depth = {int(d): m for d, m in claims.by_depth.items()}
        run_model = claims.models[0] if claims.models else self.settings.model
        model = request.model or routing.default_model(
            claims.depth, run_model, claims.sub_model, by_depth
        )
        tokens.check_scope(claims, request.kind, None if request.kind == "tool" else model)
        stop = self._stopped(claims.run_id)
        if stop.is_set():
            return SubcallResponse(responses=[], cancelled=True, error="the run was cancelled")
        if request.kind == "tool":
            return self._tool(claims, request)
        if request.kind == "rlm" and tools.catalog_digest(request.tools) != claims.sub_tools:
            raise tokens.OutOfScope("the child RLMs' tools do not match the ones this run declared")
        memo = self._memo(claims.run_id)
        key = (claims.depth, request.kind, model, tuple(request.prompts))
        if claims.nonce.startswith("replay-"):
            remembered = memo.replay(key)
            if remembered is not None:
                return SubcallResponse(responses=remembered, usage={})
        usage: UsageByModel = {}
        lock = threading.Lock()
        recursive = request.kind == "rlm" and claims.depth < claims.max_depth

        def one(prompt: str) -> tuple[str, list[dict[str, Any]] | None]:
            if stop.is_set():
                raise _Cancelled
            if recursive:
                text, used, trajectory = self._child(claims, prompt, model, request.tools)
            else:
                completion = self.llm.complete([{"role": "user", "content": prompt}], model)
                text, used, trajectory = completion.text, {completion.model: completion.usage}, None
            with lock:
                merge_usage(usage, used)
            return text, trajectory

        workers = max(1, min(len(request.prompts), self.settings.subcall_concurrency))
        pool = ThreadPoolExecutor(workers, thread_name_prefix="subcall")
        try:
            futures = [pool.submit(one, prompt) for prompt in request.prompts]
            pending = set(futures)
            while pending and not stop.is_set():
                pending = wait(pending, 0.05).not_done
            if stop.is_set():  # calls in flight are not waited for: their answers are lost
                return SubcallResponse(responses=[], usage=usage, cancelled=True,
                                       error="the run was cancelled")  # fmt: skip
            results = [f.result() for f in futures]
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        responses = [text for text, _ in results]
        memo.record(key, responses)
        memo.log(
            claims.nonce,
            {
                "kind": request.kind,
                "model": model,
                "depth": claims.depth + 1 if recursive else claims.depth,
                "calls": [
                    {"prompt": p[:LOGGED_CHARS], "response": r[:LOGGED_CHARS], "trajectory": t}
                    for p, (r, t) in zip(request.prompts, results, strict=True)
                ],
                "usage": {m: u.model_dump() for m, u in usage.items()},
            },
        )
        return SubcallResponse(responses=responses, usage=usage)

    def _tool(self, claims: tokens.TokenClaims, request: SubcallRequest) -> SubcallResponse:
        """A caller's tool; its failures are answers the guest raises, not HTTP errors."""
        name = request.tool or ""
        spec = tools.authorize(claims, name, request.tools)
        arguments = request.arguments or {}
        args, kwargs = arguments.get("args") or [], arguments.get("kwargs") or {}
        memo = self._memo(claims.run_id)
        key = (claims.depth, "tool", name, json.dumps(arguments, sort_keys=True))
        if claims.nonce.startswith("replay-"):  # a rebuilt session does not call a tool twice
            remembered = memo.replay(key)
            if remembered is not None:
                return SubcallResponse.model_validate_json(remembered[0])
        try:
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise tools.ToolCallError(f"{name}: malformed arguments")
            reply = SubcallResponse(responses=[], result=self.tools.call(name, spec, args, kwargs))
        except tools.ToolCallError as e:
            reply = SubcallResponse(responses=[], error=str(e))
        memo.record(key, [reply.model_dump_json()])
        shown = json.dumps(reply.result) if reply.error is None else f"ToolError: {reply.error}"
        memo.log(claims.nonce, {  # in the trajectory, as sub-calls are
            "kind": "tool", "model": name, "depth": claims.depth, "usage": {},
            "calls": [{"prompt": json.dumps(arguments)[:LOGGED_CHARS],
                       "response": shown[:LOGGED_CHARS], "trajectory": None}],
        })  # fmt: skip
        return reply

    def _child(
        self, claims: Any, prompt: str, model: str, sub_tools: Any = None
    ) -> tuple[str, UsageByModel, list[dict[str, Any]]]:
        """A child RLM at depth + 1 whose context is the prompt."""
        remaining = max(1.0, claims.exp - time.time() - _TOKEN_SLACK_S)
        config = RunConfig(
            model=model,
            sub_model=claims.sub_model,
            max_depth=claims.max_depth,
            max_iterations=self.settings.max_iterations,
            max_timeout_s=remaining,
            output_chars=self.settings.output_chars,
            cell_timeout_s=self.settings.cell_timeout_s,
            allowed_models=claims.models,
            models_by_depth={int(d): m for d, m in claims.by_depth.items()},
            tools=sub_tools or {},
            sub_tools=sub_tools or {},
        )
        child = Run(
            config=config,
            llm=self.llm,
            executor=self.executor,
            grants=self,
            depth=claims.depth + 1,
            run_id=f"{claims.run_id}.{uuid.uuid4().hex[:6]}",
        )
        child.cancelled = self._stopped(claims.run_id).is_set
        result = child.completion(CHILD_QUERY, prompt)
        answer = result.answer if result.answer is not None else f"[child RLM {result.status}: "
        if result.answer is None:
            answer += f"{result.stop_reason or result.error}]"
        return answer, result.usage, child.trajectory

    def _memo(self, run_id: str) -> Memo:
        root = run_id.split(".")[0]
        with self._memo_lock:
            memo = self._memos.get(root)
            if memo is None:
                memo = self._memos[root] = Memo()
                while len(self._memos) > _MEMO_RUNS:
                    self._memos.popitem(last=False)
            self._memos.move_to_end(root)
            return memo


CHILD_QUERY = "Carry out the request written in `context` and give its answer."


class Busy(TooManyRequests):
    """This process runs its maximum of runs."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{message}; retry shortly", headers={"Retry-After": "2"})


def _inherit(sub_tools: Any, tools: Any) -> Any:
    """`custom_sub_tools` as the official library reads it: None inherits, {} means none."""
    return (tools if sub_tools is None else sub_tools) or {}


class _Cancelled(Exception):
    """A batch's call not started because the run was cancelled."""

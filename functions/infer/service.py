"""The infer plane's work, without HTTP: runs, sub-calls and child runs, wired together.

The HTTP function (`main.py`) and the embedded SDK both drive an `InferService`; the loop is
never written twice. What a run may do and what it has spent is kept in the ledger, so any
infer process serves any run's sub-calls and cancel.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import threading
import time
import uuid
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
from functions.infer.account import Account
from functions.infer.compaction import context_window
from functions.infer.conversations import ConversationStore
from functions.infer.executor import Executor
from functions.infer.ledger import (
    ANONYMOUS,
    HEARTBEAT_S,
    Ledger,
    LedgerUnavailable,
    MemoryStore,
    RunKey,
)
from functions.infer.loop import Emit, Run, RunConfig
from functions.infer.schemas import AnswerSchema
from functions.infer.settings import InferSettings
from functions.urls import Allowlist

_TOKEN_SLACK_S = 30.0  # past a cell's deadline, for its last sub-call to arrive
LOGGED_CHARS = 4000  # of each sub-call prompt and answer, in the trajectory
PREVIEW_CHARS = 300  # of each sub-call prompt and answer, in a `subcall` progress event


class InferService:
    def __init__(
        self,
        settings: InferSettings,
        llm: Any,
        executor: Executor,
        callback_url: str | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self.settings = settings
        self.llm = llm
        self.executor = executor
        self.callback_url = (callback_url or settings.callback_url).rstrip("/") + "/subcalls"
        self.token_key = settings.token_key or secrets.token_bytes(32)
        self.ledger = ledger or Ledger(MemoryStore())
        self._runs = threading.BoundedSemaphore(settings.max_runs)
        self.sink: Any = None  # a ProgressSink when K_SINK is set
        self.conversations = ConversationStore(
            self.ledger,
            self.token_key,
            settings.conversation_ttl_s,
            settings.conversation_max_bytes,
            turn_s=settings.cell_timeout_s * (settings.max_iterations + 2),
        )
        self.tools = tools.ToolRunner(  # embedded, the SDK registers its functions here
            Allowlist.of("RLM_TOOL_URL_PREFIXES", settings.tool_url_prefixes)
        )
        self.context_urls = Allowlist.of(
            "INFER_CONTEXT_URL_PREFIXES", settings.context_url_prefixes
        )
        # The progress callbacks of the root runs this process serves, for their sub-calls
        # served here too (on another pod a run's sub-calls report nothing).
        self._emits: dict[RunKey, Emit] = {}

    # ----------------------------------------------------------------- runs

    def config_for(self, request: InferRequest) -> RunConfig:
        """The run's configuration within the operator's ceilings: `Unprocessable`, naming the
        setting, for a request that asks for more than they allow, names a model they do not,
        declares tools this process cannot or may not call, or an output schema it cannot use."""
        s = self.settings
        _at_most("max_depth", request.max_depth, s.max_depth, "MAX_DEPTH")
        _at_most("max_iterations", request.max_iterations, s.max_iterations, "MAX_ITERATIONS")
        _at_most("max_budget_usd", request.max_budget_usd, s.max_budget_usd, "INFER_MAX_BUDGET_USD")
        _at_most("max_timeout_s", request.max_timeout_s, s.max_timeout_s, "INFER_MAX_TIMEOUT")
        config = RunConfig(
            model=request.model or s.model,
            sub_model=request.sub_model or s.sub_model,
            max_depth=s.max_depth if request.max_depth is None else request.max_depth,
            max_iterations=request.max_iterations or s.max_iterations,
            max_budget_usd=request.max_budget_usd or s.default_budget_usd,
            max_tokens=request.max_tokens,
            max_timeout_s=request.max_timeout_s or s.max_timeout_s,
            max_errors=request.max_errors,
            output_chars=s.output_chars,
            cell_timeout_s=s.cell_timeout_s,
            root_prompt=request.root_prompt,
            compaction=request.compaction,
            compaction_threshold=request.compaction_threshold or s.compaction_threshold,
            context_window=context_window(request.model or s.model, s.context_windows),
            context_windows=s.context_windows,
            max_output_tokens=s.llm_max_output_tokens,
            allowed_models=request.models or [],
            models_by_depth=request.models_by_depth or {},
            tools=request.custom_tools or {},
            sub_tools=_inherit(request.custom_sub_tools, request.custom_tools),
            output_schema=None
            if request.output_schema is None
            else AnswerSchema.of(request.output_schema, s.max_schema_bytes),
            schema_repairs=s.schema_repairs,
        )
        for model in config.models:
            self._check_model(model)
        for catalog in (config.tools, config.sub_tools):
            tools.check_catalog(
                catalog, self.tools.functions, self.tools.allowed, s.max_schema_bytes
            )
        return config

    def _check_model(self, model: str) -> None:
        s = self.settings
        if s.models is not None and model not in s.models:
            raise Unprocessable(f"model {model!r} is not one this deployment serves "
                                f"(INFER_MODELS: {', '.join(s.models)})")  # fmt: skip
        if not s.allow_unpriced and self.llm.prices.price(model) is None:
            raise Unprocessable(
                f"model {model!r} has no price, so no budget would bound it; this deployment "
                "runs only priced models (LLM_PRICES; INFER_ALLOW_UNPRICED is off)"
            )

    def run(
        self,
        request: InferRequest,
        context: Any,
        emit: Emit | None = None,
        traceparent: str | None = None,
        cancelled: Callable[[], bool] | None = None,
        run_id: str | None = None,
        caller: str = ANONYMOUS,
        on_start: Callable[[str, str], None] | None = None,
        cancel_token: str | None = None,
    ) -> InferResult:
        """One root run of `caller` (the run's owner in the ledger).

        `on_start(run_id, cancel_token)` is called once the ledger has the run (`cancel_token`:
        the caller's own, when it chose one). Raises `Busy` when this process runs its maximum,
        `Conflict` for a run id of the caller's already running, `Unprocessable` for tools it
        cannot serve, `ConversationError` when the conversation cannot take another turn,
        `LedgerUnavailable` when the ledger cannot be reached."""
        config = self.config_for(request)
        root = RunKey(caller, run_id or request.run_id or uuid.uuid4().hex[:16])
        if not self._runs.acquire(timeout=0.5):
            raise Busy(f"this infer process is running its maximum of {self.settings.max_runs}")
        lifetime = config.max_timeout_s or config.cell_timeout_s * (config.max_iterations + 2)
        try:
            secret, resume = self.ledger.open_run(
                root, config.max_budget_usd, config.max_tokens, lifetime + _TOKEN_SLACK_S,
                cancel_token,
            )  # fmt: skip
        except BaseException:  # not this process's run: nothing of it to finish
            self._runs.release()
            raise
        turn, status, beating = None, "failed", _Heartbeat(self.ledger, root)
        if emit is not None:
            self._emits[root] = emit
        try:
            if on_start is not None:
                on_start(root.run_id, secret)
            if request.persistent or request.conversation_id:
                turn = self.conversations.begin(
                    caller, request.conversation_id, context, request.conversation
                )
            run = Run(
                config=config,
                account=self._account(root),
                executor=self.executor,
                grants=self,
                emit=emit,
                traceparent=traceparent,
                turn=turn,
                run_id=root.run_id,
                root=root,
                resume=resume if turn is None else None,
            )
            run.cancelled = lambda: bool(cancelled and cancelled()) or self.ledger.cancelled(root)
            result = run.completion(request.query, context)
            status = result.status
            if request.trajectory:
                result.trajectory = run.trajectory
        finally:
            beating.stop()
            self._emits.pop(root, None)
            carried = self.conversations.end(turn) if turn is not None else None
            self._runs.release()
            with contextlib.suppress(LedgerUnavailable):  # the record expires by itself
                self.ledger.finish_run(root, status)
        if turn is not None:
            result.conversation_id, result.conversation = turn.conversation_id, carried
        return result

    def cancel(self, run_id: str, caller: str = ANONYMOUS, cancel_token: str | None = None) -> None:
        """Cancel a run of `caller`, wherever it runs: its cells end at their next sub-call.
        `NotFound` for no such run of theirs; `Forbidden` in local mode without its token."""
        self.ledger.cancel(RunKey(caller, run_id), cancel_token)

    def stop(self, run_id: str, caller: str = ANONYMOUS) -> None:
        """Stop a run this process serves for `caller` (its client hung up, or the embedding
        program asked): no token needed."""
        self.ledger.mark_cancelled(RunKey(caller, run_id))

    def _account(self, root: RunKey) -> Account:
        return Account(self.llm, self.ledger, root, self.settings.llm_max_output_tokens)

    def grant(self, run: Run, replay: bool) -> Callback:
        """A cell's callback: a token for this cell only, valid until the next cell of the run
        or its deadline, whichever comes first."""
        ttl = run.config.cell_timeout_s + _TOKEN_SLACK_S
        remaining = run.remaining()
        if remaining is not None:
            ttl = min(ttl, max(remaining, 0) + _TOKEN_SLACK_S)
        claims = tokens.TokenClaims(
            run_id=run.run_id,
            owner=run.root.owner,
            root=run.root.run_id,
            depth=run.depth,
            max_depth=run.config.max_depth,
            exp=int(time.time() + ttl),
            models=run.config.models,
            nonce=("replay-" if replay else "") + uuid.uuid4().hex,
            prompts=self.settings.cell_subcalls,
            sub_model=run.config.sub_model,
            by_depth={str(d): m for d, m in run.config.models_by_depth.items()},
            tools={name: tools.digest(spec) for name, spec in run.config.tools.items()},
            sub_tools=tools.catalog_digest(run.config.sub_tools),
        )
        self.ledger.open_cell(run.root, run.run_id, claims.nonce, replay, ttl)
        return Callback(
            url=self.callback_url,
            token=tokens.mint(self.token_key, claims),
            tools=run.config.tools,
            sub_tools=run.config.sub_tools,
        )

    def served(self, callback: Callback) -> list[dict[str, Any]]:
        claims = tokens.verify(self.token_key, callback.token, check_expiry=False)
        return self.ledger.take_log(RunKey(claims.owner, claims.root), claims.nonce)

    def checkpoint(self, run: Run, state: dict[str, Any]) -> None:
        if run.depth == 0 and run.turn is None:  # a conversation's turn starts over instead
            self.ledger.checkpoint(run.root, state)

    # ----------------------------------------------------------------- sub-calls

    def subcall(self, token: str, request: SubcallRequest) -> SubcallResponse:
        """Serve the guest's sub-call. Refuses (401/403) before any cost: a token that is not
        the current cell's of a live run, a call out of its scope, prompts over the cell's cap,
        a call the budget cannot cover."""
        claims = tokens.verify(self.token_key, token)
        root = RunKey(claims.owner, claims.root)
        by_depth = {int(d): m for d, m in claims.by_depth.items()}
        run_model = claims.models[0] if claims.models else self.settings.model
        model = request.model or routing.default_model(
            claims.depth, run_model, claims.sub_model, by_depth
        )
        tokens.check_scope(claims, request.kind, None if request.kind == "tool" else model)
        if request.kind == "rlm" and tools.catalog_digest(request.tools) != claims.sub_tools:
            raise tokens.OutOfScope("the child RLMs' tools do not match the ones this run declared")
        count = len(request.prompts) if request.kind != "tool" else 1
        keep_s = self.ledger.take_prompts(root, claims.run_id, claims.nonce, count, claims.prompts)
        if self.ledger.cancelled(root):
            return _cancelled()
        if request.kind == "tool":
            return self._tool(claims, root, request, keep_s)
        call = json.dumps([claims.depth, request.kind, model, prompts_digest(request.prompts)])
        if claims.nonce.startswith("replay-"):  # a rebuilt session calls no model twice
            remembered = self.ledger.recall(root, call)
            if remembered is not None:
                return SubcallResponse(responses=remembered, usage={})
        account = self._account(root)
        usage: UsageByModel = {}
        lock = threading.Lock()
        recursive = request.kind == "rlm" and claims.depth < claims.max_depth
        stop = threading.Event()
        report = self._progress(root, claims, request.kind, model, len(request.prompts))
        finished = [0]

        def one(prompt: str) -> tuple[str, list[dict[str, Any]] | None]:
            if stop.is_set():
                raise _Cancelled
            started = time.monotonic()
            if recursive:
                text, used, trajectory = self._child(claims, root, prompt, model, request.tools)
            else:
                completion = account.complete([{"role": "user", "content": prompt}], model)
                text, used, trajectory = completion.text, {completion.model: completion.usage}, None
            with lock:
                merge_usage(usage, used)
                finished[0] += 1
                done = finished[0]
            report("subcall", {
                "done": done, "prompt": prompt[:PREVIEW_CHARS], "prompt_chars": len(prompt),
                "response": text[:PREVIEW_CHARS], "response_chars": len(text),
                "seconds": round(time.monotonic() - started, 4),
                "usage": {m: u.model_dump() for m, u in used.items()},
            })  # fmt: skip
            return text, trajectory

        report("subcalls", {})

        workers = max(1, min(len(request.prompts), self.settings.subcall_concurrency))
        pool = ThreadPoolExecutor(workers, thread_name_prefix="subcall")
        try:
            futures = [pool.submit(one, prompt) for prompt in request.prompts]
            pending = set(futures)
            while pending:
                pending = wait(pending, _CANCEL_POLL_S).not_done
                if pending and self.ledger.cancelled(root):
                    stop.set()  # calls in flight are not waited for: their answers are lost
                    return _cancelled(usage)
            results = [f.result() for f in futures]
        finally:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
        responses = [text for text, _ in results]
        self.ledger.remember(root, call, responses, keep_s)
        self.ledger.log(
            root,
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
            keep_s,
        )
        return SubcallResponse(responses=responses, usage=usage)

    def _progress(
        self, root: RunKey, claims: tokens.TokenClaims, kind: str, model: str, total: int
    ) -> Callable[[str, dict[str, Any]], None]:
        """How a batch reports to its root run's progress: `subcalls` when it starts, then a
        `subcall` as each call completes (any order), with previews of its prompt and answer."""
        emit = self._emits.get(root)
        common = {"run_id": claims.run_id, "depth": claims.depth, "kind": kind,
                  "model": model, "total": total}  # fmt: skip

        def report(event: str, data: dict[str, Any]) -> None:
            if emit is not None:
                emit(event, {**common, **data})

        return report

    def _tool(
        self, claims: tokens.TokenClaims, root: RunKey, request: SubcallRequest, keep_s: float
    ) -> SubcallResponse:
        """A caller's tool; its failures are answers the guest raises, not HTTP errors."""
        name = request.tool or ""
        spec = tools.authorize(claims, name, request.tools)
        arguments = request.arguments or {}
        args, kwargs = arguments.get("args") or [], arguments.get("kwargs") or {}
        call = json.dumps([claims.depth, "tool", name, arguments], sort_keys=True)
        if claims.nonce.startswith("replay-"):  # a rebuilt session does not call a tool twice
            remembered = self.ledger.recall(root, call)
            if remembered is not None:
                return SubcallResponse.model_validate_json(remembered[0])
        try:
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise tools.ToolCallError(f"{name}: malformed arguments")
            reply = SubcallResponse(responses=[], result=self.tools.call(name, spec, args, kwargs))
        except tools.ToolCallError as e:
            reply = SubcallResponse(responses=[], error=str(e))
        self.ledger.remember(root, call, [reply.model_dump_json()], keep_s)
        shown = json.dumps(reply.result) if reply.error is None else f"ToolError: {reply.error}"
        self.ledger.log(root, claims.nonce, {  # in the trajectory, as sub-calls are
            "kind": "tool", "model": name, "depth": claims.depth, "usage": {},
            "calls": [{"prompt": json.dumps(arguments)[:LOGGED_CHARS],
                       "response": shown[:LOGGED_CHARS], "trajectory": None}],
        }, keep_s)  # fmt: skip
        return reply

    def _child(
        self,
        claims: tokens.TokenClaims,
        root: RunKey,
        prompt: str,
        model: str,
        sub_tools: Any = None,
    ) -> tuple[str, UsageByModel, list[dict[str, Any]]]:
        """A child RLM at depth + 1 whose context is the prompt, paid from the root's budget."""
        remaining = max(1.0, claims.exp - time.time() - _TOKEN_SLACK_S)
        config = RunConfig(
            model=model,
            sub_model=claims.sub_model,
            max_depth=claims.max_depth,
            max_iterations=self.settings.max_iterations,
            max_timeout_s=remaining,
            output_chars=self.settings.output_chars,
            cell_timeout_s=self.settings.cell_timeout_s,
            context_windows=self.settings.context_windows,
            max_output_tokens=self.settings.llm_max_output_tokens,
            allowed_models=claims.models,
            models_by_depth={int(d): m for d, m in claims.by_depth.items()},
            tools=sub_tools or {},
            sub_tools=sub_tools or {},
        )
        self.ledger.start_child(root, self.settings.max_children)
        try:
            child = Run(
                config=config,
                account=self._account(root),
                executor=self.executor,
                grants=self,
                depth=claims.depth + 1,
                run_id=f"{claims.run_id}.{uuid.uuid4().hex[:6]}",
                root=root,
            )
            child.cancelled = lambda: self.ledger.cancelled(root)
            result = child.completion(CHILD_QUERY, prompt)
        finally:
            self.ledger.end_child(root)
        if result.status == "completed":
            return result.answer or "", result.usage, child.trajectory
        # The parent's model is told the child did not finish, and what it had so far.
        answer = f"[child RLM {result.status}: {result.stop_reason or result.error}]"
        if result.answer is not None:
            answer += f" partial answer: {result.answer}"
        return answer, result.usage, child.trajectory


def prompts_digest(prompts: list[str]) -> str:
    """A batch's prompts as one sha256, each prompt's length first, without joining them (a
    batch may hold hundreds of megabytes): the memo's key needs only their identity."""
    digest = hashlib.sha256()
    for prompt in prompts:
        data = prompt.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


CHILD_QUERY = "Carry out the request written in `context` and give its answer."


class Busy(TooManyRequests):
    """This process runs its maximum of runs."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{message}; retry shortly", headers={"Retry-After": "2"})


def _at_most(field: str, asked: float | None, ceiling: float | None, setting: str) -> None:
    if asked is not None and ceiling is not None and asked > ceiling:
        raise Unprocessable(f"{field} {asked:g} is above this deployment's {setting} "
                            f"{ceiling:g}: ask for at most {ceiling:g}")  # fmt: skip


def _inherit(sub_tools: Any, tools: Any) -> Any:
    """`custom_sub_tools` as the official library reads it: None inherits, {} means none."""
    return (tools if sub_tools is None else sub_tools) or {}


class _Heartbeat:
    """Says in the ledger that a run's process is alive, until stopped."""

    def __init__(self, ledger: Ledger, root: RunKey) -> None:
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, args=(ledger, root), daemon=True, name="heartbeat"
        )
        self._thread.start()

    def _beat(self, ledger: Ledger, root: RunKey) -> None:
        while not self._done.wait(HEARTBEAT_S):
            with contextlib.suppress(LedgerUnavailable):
                ledger.heartbeat(root)

    def stop(self) -> None:
        self._done.set()


_CANCEL_POLL_S = 0.25  # how often a waiting batch looks at the run's cancel flag


def _cancelled(usage: UsageByModel | None = None) -> SubcallResponse:
    return SubcallResponse(
        responses=[], usage=usage or {}, cancelled=True, error="the run was cancelled"
    )


class _Cancelled(Exception):
    """A batch's call not started because the run was cancelled."""

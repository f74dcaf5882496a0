"""The Recursive Language Model loop: the root model writes code, the sandbox runs it, repeat.

One `Run` is one RLM at one depth. Its sub-calls (and child runs at depth + 1) are served by
the infer plane's sub-call endpoint, which `Run` reaches only through the tokens it mints.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from functions.contract import (
    Callback,
    ExecuteResponse,
    InferResult,
    Limits,
    ToolCatalog,
    UsageByModel,
    merge_usage,
    new_scope,
    total_usage,
)
from functions.errors import StopCode
from functions.infer import compaction, parsing, prompts
from functions.infer.account import Account
from functions.infer.compaction import DEFAULT_WINDOW, context_window
from functions.infer.executor import ExecuteError, Executor, ReplSession
from functions.infer.ledger import ANONYMOUS, BudgetRefused, LedgerUnavailable, RunKey
from functions.infer.llm import Completion, DeadlineReached, LLMError
from functions.infer.routing import allowed_models, default_model
from functions.infer.schemas import AnswerSchema, Checked
from functions.infer.tools import prompt_section

if TYPE_CHECKING:
    from functions.infer.conversations import Turn

Emit = Callable[[str, dict[str, Any]], None]
EVENT_TEXT_CHARS = 4000  # of a reply (its start) or a cell's output (its end) in an event


class Grants(Protocol):
    """What lets a run's cells call back into infer: the service that serves sub-calls."""

    def grant(self, run: Run, replay: bool) -> Callback | None:
        """The callback (URL and token) a cell of `run` sends; `replay` for a rebuilt one."""
        ...

    def served(self, callback: Callback) -> list[dict[str, Any]]:
        """The sub-calls served under `callback`, for the trajectory (taken once)."""
        ...

    def checkpoint(self, run: Run, state: dict[str, Any]) -> None:
        """Where `run` is after a step: what it resumes from if its process dies."""
        ...


@dataclass
class RunConfig:
    model: str
    sub_model: str | None = None
    max_depth: int = 1
    max_iterations: int = 30
    max_budget_usd: float | None = None
    max_tokens: int | None = None
    max_timeout_s: float | None = None
    max_errors: int | None = None
    output_chars: int = 20_000
    cell_timeout_s: float = 300.0
    root_prompt: str | None = None
    compaction: bool = False
    compaction_threshold: float = 0.85
    context_window: int = DEFAULT_WINDOW  # the root model's, in tokens
    context_windows: dict[str, int] = field(default_factory=dict)  # LLM_CONTEXT_WINDOWS
    max_output_tokens: int | None = None  # LLM_MAX_OUTPUT_TOKENS: one model call's cap
    allowed_models: list[str] = field(default_factory=list)  # more models the guest may name
    models_by_depth: dict[int, str] = field(default_factory=dict)
    tools: ToolCatalog = field(default_factory=dict)  # what this run's cells may call
    sub_tools: ToolCatalog = field(default_factory=dict)  # what its child RLMs may call
    output_schema: AnswerSchema | None = None  # the answer must match it (a typed answer)
    schema_repairs: int = 1  # turns given to fix an answer that does not match it

    @property
    def models(self) -> list[str]:
        return allowed_models(self.model, self.sub_model, self.models_by_depth, self.allowed_models)


class BudgetStop(Exception):
    """Control flow inside the loop: a limit stopped the run."""

    def __init__(self, code: StopCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass
class Run:
    """One RLM run. `grants` gives the callback each cell sends."""

    config: RunConfig
    account: Account  # the model client: every call paid from the run tree's budget
    executor: Executor
    grants: Grants
    depth: int = 0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    root: RunKey = field(default_factory=lambda: RunKey(ANONYMOUS, uuid.uuid4().hex[:16]))
    emit: Emit | None = None
    traceparent: str | None = None
    usage: UsageByModel = field(default_factory=dict)
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    cancelled: Callable[[], bool] = lambda: False
    callback: Callback | None = None  # the current cell's
    turn: Turn | None = None  # a question of a persistent conversation
    resume: dict[str, Any] | None = None  # a checkpoint to go on from (its process died)
    _replaying: bool = False  # cells re-run on resume get their sub-calls from the memo
    _answer_reset: bool = False  # the next cell starts with `answer` emptied (a repair turn)

    # ----------------------------------------------------------------- public

    def completion(self, query: str, context: Any) -> InferResult:
        turn = self.turn
        session = ReplSession(
            executor=self.executor,
            # A caller may choose the run id: the session id adds a part no one can guess.
            session_id=turn.session_id
            if turn
            else f"{self.run_id}-d{self.depth}-{secrets.token_hex(8)}",
            scope=turn.scope if turn else new_scope(),
            context=context,
            limits=Limits(deadline_s=self.config.cell_timeout_s),
            mint_callback=self._grant,
            contexts=turn.contexts if turn else None,
            context_refs=turn.refs if turn else None,
            base=turn.base if turn else None,
        )
        system = self._system_prompt()
        opening = prompts.first_user_message(query, *_describe(context), self._left(0))
        if turn is not None:
            opening += turn.note()
        messages = [{"role": "system", "content": system}, {"role": "user", "content": opening}]
        compactor = self._compactor()
        last = self.config.max_iterations
        errors, partial, start, pending = 0, None, 1, None
        if self.resume is not None:
            messages, errors, partial, start, pending = self._resumed(self.resume, session)
        self._record_run(query, messages[0]["content"], messages[1]["content"])
        iterations, reply, previous = start - 1, None, None
        try:
            for iterations in range(start, last + 1):
                cut = False
                if pending is None:
                    self._check_budgets()
                    if compactor is not None and compactor.due(messages):
                        self._compact(compactor, messages, session, iterations)
                    self._event("turn", {"iteration": iterations})
                    completion = self._ask(messages, iterations)
                    reply, cut = completion.text, completion.finish_reason == "length"
                    messages.append({"role": "assistant", "content": reply})
                    self._checkpoint("reply", iterations, messages, session, errors, partial)
                else:  # resumed after the reply: its cells run again, sub-calls from the memo
                    reply, pending, self._replaying = pending, None, True
                blocks = parsing.find_code_blocks(reply)
                outputs = []
                for code in blocks:
                    response = self._cell(session, code, iterations)
                    errors = errors + 1 if response.error else 0
                    if response.answer and response.answer.content is not None:
                        partial = response.answer.content
                    if _answered(response):
                        return self._accept(response.answer.content, iterations, messages, session)
                    outputs.append(self._shown(response))
                    if self.config.max_errors and errors >= self.config.max_errors:
                        raise BudgetStop(
                            StopCode.MAX_ERRORS, f"max_errors: {errors} failing cells in a row"
                        )
                self._replaying = False
                final = self._final_from_text(reply, session, iterations, outputs)
                if final is not None:
                    return self._accept(final, iterations, messages, session)
                repeated, previous = bool(blocks) and blocks == previous, blocks
                left = self._left(iterations) if iterations < last else None
                message = prompts.iteration_user_message(outputs, left, cut, repeated)
                if left is None:  # no user message twice in a row: some chat templates refuse it
                    message += "\n\n" + prompts.final_request_message()
                messages.append({"role": "user", "content": message})
                self._checkpoint("outputs", iterations, messages, session, errors, partial)
            self._check_budgets()
            reply = self._ask(messages, iterations + 1, final_request=True).text
            messages.append({"role": "assistant", "content": reply})
            final = self._final_from_text(reply, session, iterations, None)
            if final is not None:
                reason = f"max_iterations: answered in the final request after {iterations} turns"
                return self._accept(final, iterations, messages, session, final_request=True,
                                    code=StopCode.MAX_ITERATIONS, reason=reason)  # fmt: skip
            reason = f"max_iterations: no answer after {iterations} turns and the final request"
            return self._finish(
                "stopped", iterations, partial, StopCode.MAX_ITERATIONS, reason, last_reply=reply
            )
        except BudgetStop as stop:
            return self._finish(
                "stopped", iterations, partial, stop.code, str(stop), last_reply=reply
            )
        except DeadlineReached:  # the run's own time budget, not a model failure
            reason = f"max_timeout_s: {self.config.max_timeout_s} s passed"
            return self._finish(
                "stopped", iterations, partial, StopCode.MAX_TIMEOUT_S, reason, last_reply=reply
            )
        except (LLMError, ExecuteError, LedgerUnavailable) as e:
            remaining = self.remaining()
            if remaining is not None and remaining <= 0:  # the time budget ran out on the way
                reason = f"max_timeout_s: {self.config.max_timeout_s} s passed ({e})"
                return self._finish(
                    "stopped", iterations, partial, StopCode.MAX_TIMEOUT_S, reason,
                    last_reply=reply,
                )  # fmt: skip
            return self._finish("failed", iterations, partial, error=str(e), last_reply=reply)
        finally:
            if turn is not None:
                history = compactor.full_history(messages) if compactor else messages
                turn.close(session, history, self.traceparent)

    # ----------------------------------------------------------------- steps

    def _chunk_chars(self) -> int:
        """What one sub-call of this run's cells can read: from its default model's window."""
        c = self.config
        sub = default_model(self.depth, c.model, c.sub_model, c.models_by_depth)
        return prompts.chunk_chars(context_window(sub, c.context_windows), c.max_output_tokens)

    def _system_prompt(self) -> str:
        text = prompts.system_prompt(
            max_depth=self.config.max_depth,
            depth=self.depth,
            sub_model=self.config.sub_model,
            output_chars=self.config.output_chars,
            chunk_chars=self._chunk_chars(),
        )
        if self.config.root_prompt:
            text += "\n\n" + self.config.root_prompt
        if self.config.compaction:
            text += compaction.SYSTEM_NOTE
        if self.config.tools:
            text += "\n\n" + prompt_section(self.config.tools)
        if self.config.output_schema is not None:
            text += "\n\n" + prompts.output_schema_note(self.config.output_schema.shown())
        return text

    def _accept(
        self,
        content: str | None,
        iterations: int,
        messages: list[dict[str, str]],
        session: ReplSession,
        **finish: Any,
    ) -> InferResult:
        """The run's result once the model answered (`finish`: the completed result's stop
        code and reason, when it has them). With an output schema the answer is checked, one
        that misses it gets the repair turns, and one that still misses it stops the run with
        its own code."""
        schema = self.config.output_schema
        if schema is None:
            return self._finish("completed", iterations, content, **finish)
        checked = schema.check(content)
        for left in range(self.config.schema_repairs, 0, -1):
            if checked.ok:
                break
            iterations += 1
            checked, content = self._repair(
                schema, checked, content, left, iterations, messages, session
            )
        if checked.ok:
            return self._finish(
                "completed", iterations, checked.text, value=checked.value, **finish
            )
        why = f"output_schema: the answer does not match the schema ({checked.problems[0]})"
        return self._finish("stopped", iterations, content, code=StopCode.OUTPUT_SCHEMA, reason=why)

    def _repair(
        self,
        schema: AnswerSchema,
        checked: Checked,
        content: str | None,
        repairs_left: int,
        iteration: int,
        messages: list[dict[str, str]],
        session: ReplSession,
    ) -> tuple[Checked, str | None]:
        """One turn for the model to fix an answer that does not match the schema, told what
        is wrong; the answer it gives then (checked), or the old one when it gave none."""
        entry = {"iteration": iteration, "problems": list(checked.problems)}
        self._record(kind="schema_mismatch", answer=content, **entry)
        self._event("schema_mismatch", entry)
        self._check_budgets()
        repair = prompts.schema_repair_message(checked.problems, repairs_left)
        messages.append({"role": "user", "content": repair})
        self._event("turn", {"iteration": iteration, "repair": True})
        reply = self._ask(messages, iteration).text
        messages.append({"role": "assistant", "content": reply})
        self._answer_reset = True  # an answer left over from before is no answer to this turn
        blocks = parsing.find_code_blocks(reply)
        for code in blocks:
            response = self._cell(session, code, iteration)
            if _answered(response):
                return schema.check(response.answer.content), response.answer.content
        final = self._final_from_text(reply, session, iteration, None)
        if final is not None:
            return schema.check(final), final
        return Checked(problems=("the repair turn set no answer",)), content

    def _compactor(self) -> compaction.Compactor | None:
        c = self.config
        if not c.compaction:
            return None
        return compaction.Compactor(c.context_window, c.compaction_threshold)

    def _compact(
        self,
        compactor: compaction.Compactor,
        messages: list[dict[str, str]],
        session: ReplSession,
        iteration: int,
    ) -> None:
        """Ask the root for a summary, replace the conversation with it, bind `history`."""
        before = compaction.estimate_tokens(messages)
        summary = self._ask(compactor.summary_request(messages), iteration).text
        compactor.compact(messages, summary)
        history = compactor.full_history(messages)
        session.run("pass", self.traceparent, {"history": history})
        entry = {"iteration": iteration, "count": compactor.count, "tokens_before": before,
                 "tokens_after": compaction.estimate_tokens(messages),
                 "limit_tokens": compactor.limit_tokens}  # fmt: skip
        self._record(kind="compaction", summary=summary, **entry)
        self._event("compaction", entry)

    def _ask(
        self, messages: list[dict[str, str]], iteration: int, final_request: bool = False
    ) -> Completion:
        started = time.monotonic()
        try:
            completion = self.account.complete(
                messages, self.config.model, deadline=self._deadline()
            )
        except BudgetRefused as refused:
            raise BudgetStop(StopCode(refused.code), refused.message) from None
        self._add_usage({completion.model: completion.usage})
        self._record(
            kind="llm",
            iteration=iteration,
            prompt_chars=sum(len(m["content"]) for m in messages),
            response=completion.text,
            finish_reason=completion.finish_reason,
            final_request=final_request,
            usage=completion.usage.model_dump(),
            model=completion.model,
            seconds=round(time.monotonic() - started, 4),
        )
        self._event(
            "reply",
            {"iteration": iteration, "chars": len(completion.text),
             "text": completion.text[:EVENT_TEXT_CHARS]},
        )  # fmt: skip
        return completion

    def _shown(self, response: ExecuteResponse) -> str:
        """A cell's output as the model sees it next turn."""
        error = response.error.traceback or response.error.message if response.error else None
        text = prompts.format_cell_output(
            response.stdout, response.stderr, error, self.config.output_chars
        )
        if response.answer and response.answer.ready and response.answer.content is None:
            text += '\n[answer["ready"] is True but answer["content"] is not set: no answer yet]'
        return text

    def _cell(self, session: ReplSession, code: str, iteration: int) -> ExecuteResponse:
        if self.cancelled():
            raise BudgetStop(StopCode.CANCELLED, "cancelled")
        self._event("code", {"iteration": iteration, "code": code})
        started = time.monotonic()
        remaining = self.remaining()
        if remaining is not None:
            session.limits = Limits(deadline_s=max(0.1, min(self.config.cell_timeout_s, remaining)))
        variables = {"answer": {"content": None, "ready": False}} if self._answer_reset else None
        self._answer_reset = False
        response = session.run(code, self.traceparent, variables)
        self._add_usage({})  # the cell's sub-calls are in the run tree's account
        self._record(
            kind="cell",
            iteration=iteration,
            code=code,
            stdout=response.stdout,
            stderr=response.stderr,
            error=response.error.model_dump() if response.error else None,
            answer=response.answer.model_dump() if response.answer else None,
            subcalls=response.subcalls.model_dump(),
            subcall_log=self.grants.served(self.callback) if self.callback else [],
            trapped=response.trapped,
            seconds=round(time.monotonic() - started, 4),
            execution_time=response.execution_time,
        )
        self._event(
            "output",
            {
                "iteration": iteration,
                "stdout": response.stdout[-EVENT_TEXT_CHARS:],
                "stderr": response.stderr[-EVENT_TEXT_CHARS:],
                "error": response.error.message if response.error else None,
                "subcalls": response.subcalls.count,
            },
        )
        return response

    def _grant(self, replay: bool) -> Callback | None:
        callback = self.grants.grant(self, replay or self._replaying)
        if not replay:
            self.callback = callback
        return callback

    def _checkpoint(
        self,
        phase: str,
        iteration: int,
        messages: list[dict[str, str]],
        session: ReplSession,
        errors: int,
        partial: str | None,
    ) -> None:
        self.grants.checkpoint(self, {
            "phase": phase, "iteration": iteration, "messages": messages, "errors": errors,
            "partial": partial, "state_ref": session.state_ref, "state_data": session.state_data,
            "cells": session.cells, "cell_vars": session.cell_vars,
            "session_id": session.session_id, "scope": session.scope,
        })  # fmt: skip

    @staticmethod
    def _resumed(
        saved: dict[str, Any], session: ReplSession
    ) -> tuple[list[dict[str, str]], int, str | None, int, str | None]:
        """The loop's place from a checkpoint: messages, errors, partial answer, the first
        iteration to run and, when the process died after a reply, that reply."""
        session.state_ref, session.state_data = saved["state_ref"], saved["state_data"]
        # The same session on the execute plane: a pod may still hold it live.
        session.session_id = saved.get("session_id", session.session_id)
        session.scope = saved.get("scope", session.scope)
        session.cells = list(saved["cells"])
        session.cell_vars = {int(i): v for i, v in saved["cell_vars"].items()}
        messages = saved["messages"]
        if saved["phase"] == "reply":
            return messages, saved["errors"], saved["partial"], saved["iteration"], (
                messages[-1]["content"]
            )  # fmt: skip
        return messages, saved["errors"], saved["partial"], saved["iteration"] + 1, None

    def _final_from_text(
        self, reply: str, session: ReplSession, iteration: int, outputs: list[str] | None
    ) -> str | None:
        """The answer a FINAL(...) or FINAL_VAR(name) in the reply gives, if it gives one; a
        FINAL_VAR that fails shows its error in `outputs`, for the model's next turn."""
        final = parsing.find_final(reply)
        if final is None:
            return None
        if final.kind == "text":
            return final.value
        response = self._cell(session, f"FINAL_VAR({final.value!r})", iteration)
        if _answered(response):
            return response.answer.content  # type: ignore[union-attr]
        if outputs is not None:
            outputs.append(self._shown(response))
        return None

    def _finish(
        self,
        status: str,
        iterations: int,
        answer: str | None,
        code: StopCode | None = None,
        reason: str | None = None,
        error: str | None = None,
        value: Any = None,
        final_request: bool = False,
        last_reply: str | None = None,
    ) -> InferResult:
        """The result. The trajectory's final entry adds whether the answer came in the final
        request and, for a run with no answer, the model's last reply as it was."""
        usage = self.account.usage() if self.depth == 0 else self.usage
        total = total_usage(usage)
        result = InferResult(
            run_id=self.run_id,
            status=status,  # type: ignore[arg-type]
            answer=answer,
            stop_code=code,
            stop_reason=reason,
            value=value,
            error=error,
            usage=usage,
            total_cost_usd=round(total.cost_usd, 6),
            total_tokens=total.input_tokens + total.output_tokens,
            iterations=iterations,
            execution_time=round(time.monotonic() - self.started, 4),
        )
        summary = result.model_dump(mode="json", exclude={"trajectory"})
        extra: dict[str, Any] = {"final_request": final_request}
        if status != "completed":
            extra["last_reply"] = last_reply
        self._record(kind="final", **summary, **extra)
        self._event("final", summary)
        return result

    # ----------------------------------------------------------------- budgets

    def _left(self, iteration: int) -> prompts.Remaining:
        """What the run has left after `iteration` turns, as the model is told it."""
        c = self.config
        total = self.account.total()  # the run tree's, as the budgets count it
        used = total.input_tokens + total.output_tokens
        return prompts.Remaining(
            turns=c.max_iterations - iteration,
            usd=None if c.max_budget_usd is None else c.max_budget_usd - total.cost_usd,
            tokens=None if c.max_tokens is None else c.max_tokens - used,
            seconds=self.remaining(),
        )

    def _deadline(self) -> float | None:
        if self.config.max_timeout_s is None:
            return None
        return self.started + self.config.max_timeout_s

    def remaining(self) -> float | None:
        """Seconds left of the run's time budget; None without one."""
        deadline = self._deadline()
        return None if deadline is None else deadline - time.monotonic()

    def _check_budgets(self) -> None:
        c = self.config
        if self.cancelled():
            raise BudgetStop(StopCode.CANCELLED, "cancelled")
        remaining = self.remaining()
        if remaining is not None and remaining <= 0:
            raise BudgetStop(StopCode.MAX_TIMEOUT_S, f"max_timeout_s: {c.max_timeout_s} s passed")
        stopped = self.account.stopped()
        if stopped is not None:  # a sub-call's reservation was refused
            raise BudgetStop(StopCode(stopped[0]), stopped[1])
        total = self.account.total()
        if c.max_budget_usd is not None and total.cost_usd >= c.max_budget_usd:
            raise BudgetStop(
                StopCode.MAX_BUDGET_USD,
                f"max_budget_usd: spent ${total.cost_usd:.4f} of ${c.max_budget_usd}",
            )
        if c.max_tokens is not None and total.input_tokens + total.output_tokens >= c.max_tokens:
            used = total.input_tokens + total.output_tokens
            raise BudgetStop(StopCode.MAX_TOKENS, f"max_tokens: used {used} of {c.max_tokens}")

    def _add_usage(self, usage: UsageByModel) -> None:
        merge_usage(self.usage, usage)
        shown = self.account.usage() if self.depth == 0 else self.usage
        self._event("usage", {m: u.model_dump() for m, u in shown.items()})

    # ----------------------------------------------------------------- records

    def _record_run(self, query: str, system: str, first: str) -> None:
        """The trajectory's first entry: what the run was asked, and how it was set up."""
        self._record(
            kind="run",
            query=query,
            system_prompt=system,
            system_prompt_sha256=hashlib.sha256(system.encode()).hexdigest(),
            first_user_message=first,
            **{name: getattr(self.config, name) for name in _RECORDED_CONFIG},
            chunk_chars=self._chunk_chars(),
        )

    def _record(self, **entry: Any) -> None:
        entry = {
            "run_id": self.run_id,
            "depth": self.depth,
            "t": round(self._elapsed(), 4),
            **entry,
        }
        self.trajectory.append(entry)

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        if self.emit is not None:
            self.emit(kind, {"run_id": self.run_id, "depth": self.depth, **data})

    def _elapsed(self) -> float:
        return time.monotonic() - self.started


# The run's settings its trajectory's first entry records.
_RECORDED_CONFIG = ("model", "sub_model", "max_iterations", "max_depth", "max_budget_usd",
                    "max_tokens", "max_timeout_s", "max_errors", "max_output_tokens")  # fmt: skip


def _answered(response: ExecuteResponse) -> bool:
    """Whether a cell gave the answer: `answer["ready"]` with its content set."""
    return bool(response.answer and response.answer.ready and response.answer.content is not None)


def _describe(context: Any) -> tuple[str, int, list[int]]:
    """The context's type, total length and chunk lengths, for the first user message."""
    if isinstance(context, str):
        return "str", len(context), [len(context)]
    if isinstance(context, list):
        lengths = [len(x) if isinstance(x, str | list | dict) else 1 for x in context]
        return "list", sum(lengths), lengths[:100]
    if isinstance(context, dict):
        lengths = [len(str(v)) for v in context.values()]
        return "dict", sum(lengths), lengths[:100]
    return type(context).__name__, len(str(context)), [len(str(context))]

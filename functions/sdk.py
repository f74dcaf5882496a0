"""The Python API: an RLM in this process, shaped like the official `rlm` library's.

    from functions.sdk import RLM

    rlm = RLM(backend_kwargs={"model_name": "gpt-5-mini", "base_url": ..., "api_key": ...})
    result = rlm.completion(huge_text, root_prompt="Which city is named most often?")
    result.response, result.usage_summary, result.execution_time, result.metadata

`persistent=True` makes successive `completion` calls one conversation: the same REPL, with
`context_0`, `context_1`, ... and `history_0`, ... from earlier calls. `compaction=True`
summarizes the root conversation near the model's context window (`history` keeps it whole).

`environment="wasm"` (the default) runs cells in the WebAssembly sandbox in this process;
`environment="remote"` sends them to a deployed execute function
(`environment_kwargs={"url": ..., "callback_url": ...}`), which calls back into this process
for sub-calls. The loop is the same in both, and the same one the infer function runs.

The official library's spelling is accepted (`backend=`, its `environment=` names, `verbose=`,
`RLMLogger`, the result's fields): see `sdk_options` and `sdk_types`.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import replace
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from functions import sdk_options
from functions.config import ConfigError
from functions.contract import InferRequest, InferResult
from functions.errors import StopCode
from functions.infer.loop import Emit
from functions.infer.settings import InferSettings
from functions.sdk_types import RLMChatCompletion, RLMLogger

__all__ = ["RLM", "RLMChatCompletion", "RLMLogger"]

if TYPE_CHECKING:
    from functions.infer.service import InferService

DEFAULT_QUERY = "The task is written in `context`: read it and carry it out."


class RLM:
    def __init__(
        self,
        backend_kwargs: dict[str, Any] | None = None,
        *,
        backend: str | None = None,
        max_depth: int | None = None,
        max_iterations: int = 30,
        max_budget: float | None = None,
        max_timeout: float | None = None,
        max_tokens: int | None = None,
        max_errors: int | None = None,
        sub_model: str | None = None,
        logger: str | os.PathLike[str] | Callable[[dict[str, Any]], None] | RLMLogger | None = None,
        environment: str = "wasm",
        environment_kwargs: dict[str, Any] | None = None,
        on_event: Emit | None = None,
        persistent: bool = False,
        compaction: bool = False,
        compaction_threshold_pct: float | None = None,
        custom_tools: dict[str, Any] | None = None,
        custom_sub_tools: dict[str, Any] | None = None,
        other_backends: list[str] | None = None,
        other_backend_kwargs: list[dict[str, Any]] | None = None,
        models: list[str] | None = None,
        models_by_depth: dict[int, str] | None = None,
        endpoints: dict[str, dict[str, Any]] | None = None,
        verbose: bool = False,
        raise_on_stop: bool = False,
    ) -> None:
        given = sdk_options.backend_settings(backend, backend_kwargs or {}, os.environ)
        env = {**os.environ, **given}
        env.setdefault("LLM_API_KEY", "none")  # a local server needs none
        try:
            self.settings = InferSettings.from_env(env, served=False)
        except ConfigError as e:
            raise ConfigError(
                f"no LLM configured ({e}): set LLM_BASE_URL, LLM_MODEL (and LLM_API_KEY), or "
                "pass backend_kwargs={'base_url', 'model_name', 'api_key'}"
            ) from None
        # The caller is the operator here: its max_depth (else MAX_DEPTH, else 1) and its
        # max_iterations are the ceilings as well as the defaults.
        self.settings = replace(self.settings, max_iterations=max_iterations)
        if max_depth is not None:
            self.settings = replace(self.settings, max_depth=max_depth)
        extra = sdk_options.endpoints(endpoints, other_backend_kwargs, other_backends)
        if extra:
            self.settings = replace(self.settings, endpoints={**self.settings.endpoints, **extra})
        self.request_defaults = {
            "max_depth": self.settings.max_depth,
            "max_iterations": max_iterations,
            "max_budget_usd": max_budget,
            "max_timeout_s": max_timeout,
            "max_tokens": max_tokens,
            "max_errors": max_errors,
            "sub_model": sub_model,
            "compaction": compaction,
            "compaction_threshold": compaction_threshold_pct,
            "models": models,
            "models_by_depth": models_by_depth,
        }
        self.persistent = persistent
        self.conversation_id: str | None = None  # the conversation `persistent` continues
        self.logger = logger
        if verbose and on_event is None:
            from functions.progress import Progress

            on_event = Progress(verbose=True)
        self.on_event = on_event
        self.raise_on_stop = raise_on_stop
        self._callback_server: ThreadingHTTPServer | None = None
        self._running: set[str] = set()
        if other_backend_kwargs and not sub_model:
            self.request_defaults["sub_model"] = other_backend_kwargs[0].get("model_name")
        options = environment_kwargs or {}
        self.service = self._build(sdk_options.environment(environment, options), options)
        self.request_defaults.update(
            sdk_options.register_tools(self.service.tools, custom_tools, custom_sub_tools)
        )

    def _build(self, environment: str, options: dict[str, Any]) -> InferService:
        from functions.infer.wiring import build_service

        if environment == "wasm":
            return build_service(self.settings)
        if environment == "remote":
            from functions.infer.executor import RemoteExecutor
            from functions.infer.subcalls import callback_server

            if "url" not in options:
                raise ValueError("environment='remote' needs environment_kwargs={'url': ...}")
            executor = RemoteExecutor(options["url"], self.settings.cell_timeout_s + 30)
            host = options.get("callback_host", "127.0.0.1")
            service = build_service(self.settings, executor, options.get("callback_url"))
            self._callback_server = callback_server(service, host, options.get("callback_port", 0))
            if not options.get("callback_url"):
                port = self._callback_server.server_address[1]
                service.callback_url = f"http://{host}:{port}/subcalls"
            return service
        raise AssertionError(f"sdk_options.environment() let {environment!r} through")

    def completion(
        self,
        prompt: Any,
        root_prompt: str | None = None,
        output_schema: type[BaseModel] | dict[str, Any] | None = None,
        **overrides: Any,
    ) -> RLMChatCompletion:
        """Answer `root_prompt` (or the task written in `prompt`) about the context `prompt`.

        A run stopped by a limit returns its partial answer with `status` "stopped" and its
        `stop_code`; with `raise_on_stop=True` it raises the official library's typed error
        instead (`raise_for_status()`).

        `output_schema` (a pydantic model, or a JSON Schema as a dict) makes the answer typed:
        `value` is then an instance of the model (or the JSON value), or None when the run
        stopped without an answer that matches it (`stop_code` "output_schema")."""
        model, schema = typed_answer_schema(output_schema)
        fields = {"run_id": uuid.uuid4().hex[:16], **self.request_defaults, **overrides}
        if self.persistent:
            fields.update(persistent=True, conversation_id=self.conversation_id)
        if schema is not None:
            fields["output_schema"] = schema
        request = InferRequest(query=root_prompt or DEFAULT_QUERY, trajectory=True, **fields)
        self._running.add(request.run_id or "")
        try:
            result = self.service.run(request, prompt, self.on_event)
        finally:
            self._running.discard(request.run_id or "")
        if self.persistent:
            self.conversation_id = result.conversation_id
        value = result.value if model is None else typed_value(model, result)
        self._log(result.trajectory or [])
        completion = RLMChatCompletion.of(result, request.model or self.settings.model, prompt)
        completion.value = value
        return completion.raise_for_status() if self.raise_on_stop else completion

    async def acompletion(
        self, prompt: Any, root_prompt: str | None = None, **overrides: Any
    ) -> RLMChatCompletion:
        """`completion` on a worker thread, so the caller's event loop keeps running.

        Cancelling the awaiting task cancels the run (its cells stop at their next sub-call).
        """
        run_id = overrides.pop("run_id", None) or uuid.uuid4().hex[:16]
        work = asyncio.to_thread(self.completion, prompt, root_prompt, run_id=run_id, **overrides)
        try:
            return await work
        except asyncio.CancelledError:
            self.service.stop(run_id)
            raise

    def cancel(self, run_id: str | None = None) -> int:
        """Cancel the run `run_id` (`metadata["run_id"]`), or every run in progress; how many.

        A cancelled run ends with status "stopped", stop_reason "cancelled", and its usage.
        """
        ids = [one for one in ([run_id] if run_id else list(self._running)) if one in self._running]
        for one in ids:
            self.service.stop(one)
        return len(ids)

    def _log(self, trajectory: list[dict[str, Any]]) -> None:
        if self.logger is None:
            return
        if callable(self.logger):
            for entry in trajectory:
                self.logger(entry)
            return
        with Path(self.logger).open("a", encoding="utf-8") as f:
            for entry in trajectory:
                f.write(json.dumps(entry, default=str) + "\n")

    def close(self) -> None:
        self.service.executor.close()
        self.service.tools.close()
        if self._callback_server:
            self._callback_server.shutdown()
            self._callback_server.server_close()

    def __enter__(self) -> RLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def typed_answer_schema(
    output_schema: type[BaseModel] | dict[str, Any] | None,
) -> tuple[type[BaseModel] | None, dict[str, Any] | None]:
    """The pydantic model (if one was given) and the JSON Schema a typed answer must match."""
    if output_schema is None or isinstance(output_schema, dict):
        return None, output_schema
    if isinstance(output_schema, type) and issubclass(output_schema, BaseModel):
        return output_schema, output_schema.model_json_schema()
    raise TypeError(
        f"output_schema must be a pydantic model class or a JSON Schema dict, not {output_schema!r}"
    )


def typed_value(model: type[BaseModel], result: InferResult) -> BaseModel | None:
    """The typed answer as an instance of `model`. An answer the JSON Schema let through but the
    model's own validators refuse stops the run, as a mismatch does."""
    if result.status != "completed" or result.answer is None:
        return None
    try:
        return model.model_validate(result.value)
    except ValidationError as e:
        result.status = "stopped"
        result.stop_code = StopCode.OUTPUT_SCHEMA
        result.stop_reason = f"output_schema: {model.__name__} refused the answer: {e.errors()[0]}"
        result.value = None
        return None

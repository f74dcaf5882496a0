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
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from functions import sdk_options
from functions.contract import Callback, InferRequest, SubcallRequest, SubcallResponse
from functions.infer.loop import Emit
from functions.infer.settings import InferSettings

DEFAULT_QUERY = "The task is written in `context`: read it and carry it out."


@dataclass
class RLMChatCompletion:
    response: str | None
    usage_summary: dict[str, dict[str, Any]]
    execution_time: float
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return self.metadata.get("status", "")


class RLM:
    def __init__(
        self,
        backend_kwargs: dict[str, Any] | None = None,
        *,
        max_depth: int | None = None,
        max_iterations: int = 30,
        max_budget: float | None = None,
        max_timeout: float | None = None,
        max_tokens: int | None = None,
        max_errors: int | None = None,
        sub_model: str | None = None,
        logger: str | os.PathLike[str] | Callable[[dict[str, Any]], None] | None = None,
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
    ) -> None:
        kwargs = dict(backend_kwargs or {})
        env = os.environ
        base_url = kwargs.get("base_url") or env.get("LLM_BASE_URL", "")
        api_key = kwargs.get("api_key") or env.get("LLM_API_KEY", "")
        model = kwargs.get("model_name") or env.get("LLM_MODEL", "")
        missing = [n for n, v in (("LLM_BASE_URL", base_url), ("LLM_MODEL", model)) if not v]
        if missing:
            raise ValueError(
                f"no LLM configured: set {', '.join(missing)} (and LLM_API_KEY), or pass "
                "backend_kwargs={'base_url', 'model_name', 'api_key'}"
            )
        self.settings = InferSettings.from_env(
            {**env, "LLM_BASE_URL": base_url, "LLM_API_KEY": api_key or "none",
             "LLM_MODEL": model}, served=False,
        )  # fmt: skip
        # The caller is the operator here: its max_depth (else MAX_DEPTH, else 1) is the ceiling
        # as well as the default.
        if max_depth is not None:
            self.settings = replace(self.settings, max_depth=max_depth)
        if "INFER_CONVERSATION_TTL" not in env:  # in a process of its own, a conversation stays
            self.settings = replace(self.settings, conversation_ttl_s=float("inf"))
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
        self.on_event = on_event
        self._callback_server: ThreadingHTTPServer | None = None
        self._running: set[str] = set()
        self._endpoints = sdk_options.endpoints(endpoints, other_backend_kwargs, other_backends)
        if other_backend_kwargs and not sub_model:
            self.request_defaults["sub_model"] = other_backend_kwargs[0].get("model_name")
        self.service = self._build(environment, environment_kwargs or {})
        self.request_defaults.update(
            sdk_options.register_tools(self.service.tools, custom_tools, custom_sub_tools)
        )

    def _build(self, environment: str, options: dict[str, Any]) -> Any:
        from functions.infer.llm import LLM
        from functions.infer.routing import routed
        from functions.infer.service import InferService

        s = self.settings
        llm = LLM(s.base_url, s.api_key, s.llm_timeout_s, s.llm_max_retries, s.prices_json)
        prices = llm.prices
        llm = routed(llm, self._endpoints, lambda url, key: LLM(url, key, prices=prices))
        if environment == "wasm":
            from functions.execute.cells import CellRunner
            from functions.execute.settings import ExecuteSettings
            from functions.infer.executor import LocalExecutor

            holder: dict[str, Any] = {}
            runner = CellRunner(ExecuteSettings.from_env(), _InProcess(holder))
            service = InferService(s, llm, LocalExecutor(runner), "http://embedded")
            holder["service"] = service
            return service
        if environment == "remote":
            from functions.infer.executor import RemoteExecutor

            if "url" not in options:
                raise ValueError("environment='remote' needs environment_kwargs={'url': ...}")
            host = options.get("callback_host", "127.0.0.1")
            holder = {}
            self._callback_server = _serve_callbacks(holder, host, options.get("callback_port", 0))
            port = self._callback_server.server_address[1]
            callback = options.get("callback_url") or f"http://{host}:{port}"
            executor = RemoteExecutor(options["url"], s.cell_timeout_s + 30)
            service = InferService(s, llm, executor, callback)
            holder["service"] = service
            return service
        raise ValueError(f"environment must be 'wasm' or 'remote', not {environment!r}")

    def completion(
        self, prompt: Any, root_prompt: str | None = None, **overrides: Any
    ) -> RLMChatCompletion:
        """Answer `root_prompt` (or the task written in `prompt`) about the context `prompt`."""
        fields = {"run_id": uuid.uuid4().hex[:16], **self.request_defaults, **overrides}
        if self.persistent:
            fields.update(persistent=True, conversation_id=self.conversation_id)
        request = InferRequest(query=root_prompt or DEFAULT_QUERY, trajectory=True, **fields)
        self._running.add(request.run_id or "")
        try:
            result = self.service.run(request, prompt, self.on_event)
        finally:
            self._running.discard(request.run_id or "")
        if self.persistent:
            self.conversation_id = result.conversation_id
        trajectory = result.trajectory or []
        self._log(trajectory)
        return RLMChatCompletion(
            response=result.answer,
            usage_summary={m: u.model_dump() for m, u in result.usage.items()},
            execution_time=result.execution_time,
            metadata={
                "run_id": result.run_id,
                "status": result.status,
                "stop_reason": result.stop_reason,
                "error": result.error,
                "iterations": result.iterations,
                "total_cost_usd": result.total_cost_usd,
                "trajectory": trajectory,
                "conversation_id": result.conversation_id,
            },
        )

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
            self.service.cancel(run_id)
            raise

    def cancel(self, run_id: str | None = None) -> int:
        """Cancel the run `run_id` (`metadata["run_id"]`), or every run in progress; how many.

        A cancelled run ends with status "stopped", stop_reason "cancelled", and its usage.
        """
        ids = [run_id] if run_id else list(self._running)
        return sum(self.service.cancel(one) for one in ids)

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


class _InProcess:
    """The sandbox's sub-call transport when embedded: straight into the service."""

    def __init__(self, holder: dict[str, Any]) -> None:
        self.holder = holder

    def __call__(
        self, callback: Callback, request: SubcallRequest, headers: dict[str, str]
    ) -> SubcallResponse:
        from functions.execute.sandbox import SubcallRefused
        from functions.infer.llm import LLMError
        from functions.infer.tokens import TokenError

        try:
            return self.holder["service"].subcall(callback.token, request)
        except (TokenError, LLMError) as e:
            raise SubcallRefused(str(e)) from None


def _serve_callbacks(holder: dict[str, Any], host: str, port: int) -> ThreadingHTTPServer:
    """A small /subcalls endpoint for a remote execute plane to call back into this process."""
    from functions.infer.tokens import TokenError

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            token = self.headers.get("authorization", "")[7:]
            try:
                body = SubcallRequest.model_validate_json(
                    self.rfile.read(int(self.headers.get("content-length", 0)))
                )
                reply, status = holder["service"].subcall(token, body).model_dump_json(), 200
            except TokenError as e:
                reply, status = json.dumps({"error": str(e)}), e.status
            except ValueError as e:
                reply, status = json.dumps({"error": str(e)}), 422
            data = reply.encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server

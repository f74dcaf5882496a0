"""Building the infer service from its settings: the one place the parts are put together.

The served function (`main.py`) and the SDK (`functions/sdk.py`, `rlm ask`) both call
`build_service`; they differ only in the executor they hand it (or let it choose).
"""

from __future__ import annotations

import logging
from typing import Any

from functions.infer.executor import Executor
from functions.infer.ledger import Ledger, MemoryStore, RedisStore
from functions.infer.llm import LLM
from functions.infer.pricing import PriceTable
from functions.infer.routing import routed
from functions.infer.service import InferService
from functions.infer.settings import InferSettings

log = logging.getLogger("rlm.infer")

EMBEDDED_CALLBACK_URL = "http://embedded"  # never dialled: the sandbox calls the service directly


def model_client(settings: InferSettings) -> Any:
    """The model client: `LLM_BASE_URL`'s, plus one per `RLM_ENDPOINTS` endpoint, all with the
    same timeout, retries and price table."""
    prices = PriceTable(settings.prices_json)
    s = settings

    def client(base_url: str, api_key: str) -> LLM:
        return LLM(base_url, api_key, s.llm_timeout_s, s.llm_max_retries, prices=prices,
                   timeout_retries=s.llm_timeout_retries)  # fmt: skip

    return routed(client(settings.base_url, settings.api_key), settings.endpoints, client)


def build_service(
    settings: InferSettings,
    executor: Executor | None = None,
    callback_url: str | None = None,
) -> InferService:
    """The infer service. Without an `executor`, cells go to `settings.execute_url` when it is
    set (the served function) and to a sandbox in this process otherwise (embedded)."""
    if executor is None and settings.execute_url:
        from functions.infer.executor import RemoteExecutor

        executor = RemoteExecutor(settings.execute_url, settings.cell_timeout_s + 30)
    if executor is None:
        return _embedded(settings)
    return InferService(settings, model_client(settings), executor, callback_url, ledger(settings))


def ledger(settings: InferSettings) -> Ledger:
    """The run ledger: Redis at INFER_STORE_URL, else this process's memory."""
    if not settings.store_url:
        return Ledger(MemoryStore())
    return Ledger(RedisStore(settings.store_url, settings.store_password))


def _embedded(settings: InferSettings) -> InferService:
    """Cells in this process's sandbox; their sub-calls go straight into the service."""
    from functions.execute.cells import CellRunner
    from functions.execute.settings import ExecuteSettings
    from functions.infer import subcalls
    from functions.infer.executor import LocalExecutor

    transport = subcalls.InProcess()
    # One process, one run at a time: the first interpreter opens while the service is built
    # and the root model is asked its first turn; later sessions open in milliseconds.
    runner = CellRunner(ExecuteSettings.from_env(), transport, keep_spare=False)
    runner.prewarm(wait=False)
    service = InferService(
        settings, model_client(settings), LocalExecutor(runner), EMBEDDED_CALLBACK_URL,
        ledger(settings),
    )  # fmt: skip
    transport.service = service
    return service

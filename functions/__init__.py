"""Recursive Language Models as two Knative functions: `functions.infer` and `functions.execute`.

What a program needs is exported here (`from functions import RLM`); it is loaded on first use,
so each plane imports only its own libraries.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from functions.errors import (
    BudgetExceededError,
    CancellationError,
    ErrorThresholdExceededError,
    IterationLimitError,
    LimitExceeded,
    OutputSchemaError,
    RLMError,
    StopCode,
    TimeoutExceededError,
    TokenLimitExceededError,
)

if TYPE_CHECKING:
    from functions.contract import InferRequest, InferResult, ModelUsage
    from functions.sdk import RLM, RLMChatCompletion

_LAZY = {
    "RLM": "functions.sdk",
    "RLMChatCompletion": "functions.sdk",
    "InferRequest": "functions.contract",
    "InferResult": "functions.contract",
    "ModelUsage": "functions.contract",
}

__all__ = [
    "RLM",
    "BudgetExceededError",
    "CancellationError",
    "ErrorThresholdExceededError",
    "InferRequest",
    "InferResult",
    "IterationLimitError",
    "LimitExceeded",
    "ModelUsage",
    "OutputSchemaError",
    "RLMChatCompletion",
    "RLMError",
    "StopCode",
    "TimeoutExceededError",
    "TokenLimitExceededError",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'functions' has no attribute {name!r}")

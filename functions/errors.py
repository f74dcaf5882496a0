"""Every error this package raises on purpose, under one base that carries its HTTP status.

A route catches `RLMError` and answers `status` with `problem()` as the JSON body; anything else
is a bug (a 500 that names no detail). The SDK raises the same classes, and the limit errors
under `LimitExceeded` carry the run's partial answer, as the official `rlm` library's do.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class RLMError(Exception):
    """Base of every error of this package. `status` is the HTTP status it answers with."""

    status: int = 500

    def __init__(
        self,
        message: str,
        *,
        detail: Any = None,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers = headers or {}
        self.body = body

    def problem(self) -> dict[str, Any]:
        """The JSON body a route answers with."""
        body = dict(self.body or {"error": self.message})
        if self.detail is not None:
            body.setdefault("detail", self.detail)
        return body


class BadRequest(RLMError):
    status = 400


class Unauthorized(RLMError):
    status = 401


class Forbidden(RLMError):
    status = 403


class NotFound(RLMError):
    status = 404


class Conflict(RLMError):
    status = 409


class PayloadTooLarge(RLMError):
    status = 413


class Unprocessable(RLMError):
    status = 422


class TooManyRequests(RLMError):
    status = 429


class UpstreamError(RLMError):
    """A service this one depends on (the model provider, the execute plane) failed."""

    status = 502


class Unavailable(RLMError):
    """Busy or not ready: try again after `Retry-After` seconds."""

    status = 503

    def __init__(self, message: str, *, retry_after_s: int = 1, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("Retry-After", str(retry_after_s))


class StopCode(StrEnum):
    """Why a run ended without completing normally: the budget or event that stopped it."""

    MAX_ITERATIONS = "max_iterations"
    MAX_BUDGET_USD = "max_budget_usd"
    MAX_TOKENS = "max_tokens"
    MAX_TIMEOUT_S = "max_timeout_s"
    MAX_ERRORS = "max_errors"
    CANCELLED = "cancelled"
    OUTPUT_SCHEMA = "output_schema"  # the answer missed its schema, after the repair turn


class LimitExceeded(RLMError):
    """A run stopped by one of its limits; `partial_answer` is what it had set so far."""

    code: StopCode
    status = 200  # a stop is an answer, not an HTTP error

    def __init__(self, message: str, partial_answer: str | None = None, result: Any = None):
        super().__init__(message)
        self.partial_answer = partial_answer
        self.result = result


class IterationLimitError(LimitExceeded):
    code = StopCode.MAX_ITERATIONS


class BudgetExceededError(LimitExceeded):
    code = StopCode.MAX_BUDGET_USD


class TokenLimitExceededError(LimitExceeded):
    code = StopCode.MAX_TOKENS


class TimeoutExceededError(LimitExceeded):
    code = StopCode.MAX_TIMEOUT_S


class ErrorThresholdExceededError(LimitExceeded):
    code = StopCode.MAX_ERRORS


class CancellationError(LimitExceeded):
    code = StopCode.CANCELLED


class OutputSchemaError(LimitExceeded):
    """The answer did not match the requested schema, even after its repair turn."""

    code = StopCode.OUTPUT_SCHEMA


LIMIT_ERRORS: dict[StopCode, type[LimitExceeded]] = {
    cls.code: cls
    for cls in (
        IterationLimitError,
        BudgetExceededError,
        TokenLimitExceededError,
        TimeoutExceededError,
        ErrorThresholdExceededError,
        CancellationError,
        OutputSchemaError,
    )
}


# The execute plane's refusals of a cell. Execute raises them; infer's executors raise the same
# classes for what an execute pod answered, so each has one name and one status on both sides.


class MissingRefs(Conflict):
    """The pod does not hold these refs for this scope (409): re-send them with their data."""

    def __init__(self, missing: list[str]) -> None:
        message = f"this pod does not hold {' and '.join(missing)}: re-send with data"
        super().__init__(message, body={"missing": list(missing), "error": message})
        self.missing = list(missing)


class BadCell(Unprocessable):
    """The request is well-formed JSON but cannot be run as given (422)."""


class Saturated(Unavailable):
    """Every sandbox slot is busy (503 with Retry-After): retry after a pause."""

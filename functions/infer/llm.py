"""The LLM client: any OpenAI-compatible endpoint, with our own retries and usage accounting.

The openai SDK's retries are off (`max_retries=0`); ours retry 408/409/429/5xx answers,
timeouts and broken connections with exponential backoff and jitter, wait at least as long as
a Retry-After header asks, and stop at a retry count or at the caller's deadline, whichever
comes first. Then `LLMError` says what happened, with the last error as its cause.

A timed-out call is retried at most `timeout_retries` times (default once): a local server
keeps generating after its client hangs up, so every retry would queue one more full
generation behind the stuck one. Each call may carry an output cap, sent as `max_tokens` (what
every OpenAI-compatible server reads); a model that refuses that field and names
`max_completion_tokens` instead (OpenAI's reasoning models) gets the other one from then on.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import openai

from functions.contract import ModelUsage
from functions.errors import UpstreamError
from functions.infer.compaction import text_tokens
from functions.infer.pricing import PriceTable

log = logging.getLogger("rlm.llm")

Messages = Sequence[Mapping[str, Any]]
_RETRIED_STATUS = frozenset({408, 409, 429})
_MIN_ATTEMPT_S = 0.05  # an attempt with less time than this left is not started
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")  # the output cap's two spellings


class LLMError(UpstreamError):
    """The model could not be reached, refused, or answered nonsense (after any retries)."""

    def __init__(
        self,
        message: str,
        *,
        model: str = "",
        attempts: int = 1,
        provider_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.model = model
        self.attempts = attempts
        self.provider_status = provider_status  # the endpoint's last HTTP status, if any


class DeadlineReached(LLMError):
    """The caller's deadline left no time for a(nother) attempt: a time budget ran out."""


@dataclass(frozen=True)
class Completion:
    text: str
    model: str  # the model asked for: usage and prices are kept under this name
    usage: ModelUsage
    served_model: str = ""  # the name the endpoint answered with (often a dated variant)
    finish_reason: str | None = None


@dataclass(frozen=True)
class Backoff:
    """When to try again: attempt n (from 0) waits about base_s * 2**n, at most max_s."""

    max_retries: int = 4
    base_s: float = 0.5
    max_s: float = 20.0
    max_retry_after_s: float = 120.0  # a server asking for a longer pause is not waited for
    timeout_retries: int = 1  # of the retries, how many may follow a timed-out attempt

    def wait(self, attempt: int, retry_after: float | None) -> float:
        cap = min(self.max_s, self.base_s * 2**attempt)
        jittered = cap / 2 + random.random() * cap / 2
        return max(jittered, retry_after or 0.0)


class _Attempts:
    """The retry loop's decisions for one call."""

    def __init__(self, model: str, backoff: Backoff, deadline: float | None, timeout_s: float):
        self.model = model
        self.backoff = backoff
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.count = 0
        self.timeouts = 0

    def timeout(self) -> float:
        """The time the next attempt may take; raises when the deadline leaves none."""
        self.count += 1
        if self.deadline is None:
            return self.timeout_s
        left = self.deadline - time.monotonic()
        if left < _MIN_ATTEMPT_S:
            self.count -= 1
            why = f"not called: deadline reached after {self.count} tries"
            raise self._error(why, None, DeadlineReached)
        return min(self.timeout_s, left)

    def _error(self, why: str, status: int | None, kind: type[LLMError] = LLMError) -> LLMError:
        return kind(
            f"model {self.model!r} {why}",
            model=self.model,
            attempts=self.count,
            provider_status=status,
        )

    def wait_after(self, error: Exception) -> float:
        """Seconds to wait before retrying after `error`; raises `LLMError` when not to retry."""
        status = getattr(error, "status_code", None)
        if not _retryable(error):
            verb = "refused the request" if status else "call failed"
            raise self._error(f"{verb}: {_describe(error)}", status) from error
        if isinstance(error, openai.APITimeoutError):
            self.timeouts += 1
            if self.timeouts > self.backoff.timeout_retries:
                why = (
                    f"timed out {self.timeouts} times (after {self.timeout_s:g} s each); not "
                    "asked again, so a slow server is not queued one more generation"
                )
                raise self._error(why, None) from error  # fmt: skip
        retry_after = _retry_after(error)
        if retry_after is not None and retry_after > self.backoff.max_retry_after_s:
            why = f"unavailable, asks to retry after {retry_after:.0f} s: {_describe(error)}"
            raise self._error(why, status) from error
        wait = self.backoff.wait(self.count - 1, retry_after)
        late = self.deadline is not None and time.monotonic() + wait >= self.deadline
        if self.count > self.backoff.max_retries or late:
            limit = "retries" if self.count > self.backoff.max_retries else "time before deadline"
            why = f"unavailable after {self.count} tries (out of {limit}): {_describe(error)}"
            kind = LLMError if self.count > self.backoff.max_retries else DeadlineReached
            raise self._error(why, status, kind) from error
        log.warning(
            "LLM call to %r failed (%s); attempt %d of %d in %.2f s",
            self.model,
            _describe(error),
            self.count + 1,
            self.backoff.max_retries + 1,
            wait,
        )
        return wait


def _retryable(error: Exception) -> bool:
    if isinstance(error, openai.APIConnectionError):  # includes APITimeoutError
        return True
    status = getattr(error, "status_code", None)
    return isinstance(error, openai.APIStatusError) and (
        status in _RETRIED_STATUS or (status or 0) >= 500
    )


def _retry_after(error: Exception) -> float | None:
    """Seconds from Retry-After (or OpenAI's retry-after-ms), if the answer had one."""
    headers = getattr(getattr(error, "response", None), "headers", None)
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            when = email.utils.parsedate_tz(value) if name == "retry-after" else None
            if when is None:
                continue
            seconds = email.utils.mktime_tz(when) - time.time()
        if math.isfinite(seconds):
            return max(0.0, seconds)
        return math.inf if seconds > 0 else None
    return None


def _describe(error: Exception) -> str:
    status = getattr(error, "status_code", None)
    if isinstance(error, openai.APITimeoutError):
        text = "timed out"
    elif isinstance(error, openai.APIConnectionError):
        cause = error.__cause__
        text = f"connection failed ({type(cause).__name__ if cause else 'no answer'})"
    else:
        text = str(getattr(error, "message", None) or error) or type(error).__name__
    return (f"HTTP {status}: {text}" if status else text)[:300]


def _completion(response: Any, model: str, messages: Messages, prices: PriceTable) -> Completion:
    choices = getattr(response, "choices", None)
    if not choices:
        raise LLMError(f"model {model!r} returned no choices", model=model)
    choice = choices[0]
    message = getattr(choice, "message", None)
    text = getattr(message, "content", None) or ""
    if not isinstance(text, str):
        raise LLMError(f"model {model!r} returned content that is not text", model=model)
    used = getattr(response, "usage", None)
    if used is not None and used.prompt_tokens is not None:
        input_tokens, output_tokens = used.prompt_tokens, used.completion_tokens or 0
    else:  # some servers omit usage; an estimate keeps token and USD budgets working
        input_tokens = sum(text_tokens(str(m.get("content") or "")) for m in messages)
        output_tokens = text_tokens(text)
    usage = ModelUsage(
        calls=1,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_usd=prices.cost(model, input_tokens, output_tokens),
    )
    served = str(getattr(response, "model", "") or "")
    return Completion(text, model, usage, served, getattr(choice, "finish_reason", None))


class LLM:
    """A chat-completions client with retries. Thread-safe: one per process, shared by runs."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        *,
        prices: PriceTable,
        backoff_s: float = 0.5,
        max_backoff_s: float = 20.0,
        max_retry_after_s: float = 120.0,
        timeout_retries: int = 1,
    ) -> None:
        self.base_url = base_url
        self.timeout_s = timeout_s
        self.backoff = Backoff(
            max_retries, backoff_s, max_backoff_s, max_retry_after_s, timeout_retries
        )
        self.prices = prices
        self.client = openai.OpenAI(
            base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0
        )
        self._token_field: dict[str, str] = {}  # by model, once one refused "max_tokens"

    def complete(
        self,
        messages: Messages,
        model: str,
        deadline: float | None = None,
        max_tokens: int | None = None,
    ) -> Completion:
        """One chat completion. `deadline` (a `time.monotonic()` value) bounds it, retries too;
        `max_tokens` caps its output (None or 0: the server's own limit)."""
        attempts = _Attempts(model, self.backoff, deadline, self.timeout_s)
        switched = False
        while True:
            timeout = attempts.timeout()
            cap = self._arguments(model, max_tokens)
            try:
                response = self.client.chat.completions.create(
                    model=model, messages=list(messages), timeout=timeout, **cap
                )
            except openai.OpenAIError as e:
                if not switched and self._switch_token_field(e, model, cap):
                    switched, attempts.count = True, attempts.count - 1
                    continue
                time.sleep(attempts.wait_after(e))
                continue
            return _completion(response, model, messages, self.prices)

    def _arguments(self, model: str, max_tokens: int | None) -> dict[str, Any]:
        """The output cap in the field this model takes."""
        if not max_tokens:
            return {}
        return {self._token_field.get(model, TOKEN_FIELDS[0]): max_tokens}

    def _switch_token_field(self, error: Exception, model: str, sent: dict[str, Any]) -> bool:
        """Whether `error` refused the output cap's field and named the other one (then use it)."""
        if not sent or getattr(error, "status_code", None) != 400:
            return False
        (field,) = sent
        other = TOKEN_FIELDS[1 - TOKEN_FIELDS.index(field)]
        text = str(getattr(error, "message", "") or error)
        if field not in text or other not in text:
            return False
        log.warning("model %r refuses %s; sending the output cap as %s", model, field, other)
        self._token_field[model] = other
        return True

    def close(self) -> None:
        self.client.close()

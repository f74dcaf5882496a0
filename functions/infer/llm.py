"""The LLM client: any OpenAI-compatible endpoint, with our own retries and usage accounting."""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass

import httpx
import openai

from functions.contract import ModelUsage
from functions.infer.pricing import PriceTable

_RETRIED = (
    openai.RateLimitError,
    openai.InternalServerError,
    openai.APITimeoutError,
    openai.APIConnectionError,
)


class LLMError(Exception):
    """The model could not be reached or refused, after the retries."""


@dataclass
class Completion:
    text: str
    model: str
    usage: ModelUsage


class LLM:
    """Thread-safe: one client, shared by every run in the process."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        prices_json: str = "",
        backoff_s: float = 0.5,
        max_backoff_s: float = 20.0,
    ) -> None:
        self.client = openai.OpenAI(
            base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0
        )
        self.max_retries = max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.prices = PriceTable(prices_json)

    def complete(
        self, messages: list[dict[str, str]], model: str, deadline: float | None = None
    ) -> Completion:
        """One chat completion. `deadline` (time.monotonic) bounds the retries too."""
        for attempt in range(self.max_retries + 1):
            timeout = None if deadline is None else max(1.0, deadline - time.monotonic())
            try:
                response = self.client.chat.completions.create(
                    model=model, messages=messages, **({"timeout": timeout} if timeout else {})
                )
                break
            except _RETRIED as e:
                wait = self._wait(attempt, e)
                late = deadline is not None and time.monotonic() + wait > deadline
                if attempt == self.max_retries or late:
                    raise LLMError(f"model {model!r} unavailable after {attempt + 1} tries: "
                                   f"{_describe(e)}") from None  # fmt: skip
                time.sleep(wait)
            except openai.APIStatusError as e:
                raise LLMError(f"model {model!r} refused the request: {_describe(e)}") from None
            except openai.OpenAIError as e:
                raise LLMError(f"model {model!r} call failed: {e}") from None
        if not response.choices:
            raise LLMError(f"model {model!r} returned no choices")
        text = response.choices[0].message.content or ""
        used = response.usage
        input_tokens = used.prompt_tokens if used else 0
        output_tokens = used.completion_tokens if used else 0
        usage = ModelUsage(
            calls=1,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=self.prices.cost(model, input_tokens, output_tokens),
        )
        return Completion(text=text, model=model, usage=usage)

    def _wait(self, attempt: int, error: Exception) -> float:
        wait = min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random())
        response = getattr(error, "response", None)
        if isinstance(response, httpx.Response):
            with contextlib.suppress(KeyError, ValueError):
                wait = max(wait, min(self.max_backoff_s, float(response.headers["retry-after"])))
        return wait


def _describe(error: Exception) -> str:
    status = getattr(error, "status_code", None)
    text = str(getattr(error, "message", None) or error)
    return f"{status} {text}"[:300] if status else text[:300]

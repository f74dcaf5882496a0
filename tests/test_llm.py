"""The LLM client against the scripted server: answers, usage, cost, retries, deadlines."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator

import openai
import pytest

from functions.infer.llm import LLM, Backoff, DeadlineReached, LLMError
from functions.infer.pricing import PriceTable
from functions.testing.scripted_model import Fault, ModelRequest, ScriptedModel

PRICES = '{"priced": [1.0, 2.0]}'
FAST = {"backoff_s": 0.005, "max_backoff_s": 0.02}


def echo(request: ModelRequest) -> str:
    """Answers with the number in the prompt, so concurrent callers can check they got theirs."""
    found = re.search(r"\d+", request.last)
    return f"answer {found.group() if found else '?'}"


@pytest.fixture(scope="module")
def server() -> Iterator[ScriptedModel]:
    with ScriptedModel(echo) as model:
        yield model


@pytest.fixture
def model(server: ScriptedModel) -> Iterator[ScriptedModel]:
    server.reset()
    server.api_key = None
    server.send_usage = True
    server.policy = echo
    yield server
    server.reset()


def client(model: ScriptedModel, **options: object) -> LLM:
    settings = {"timeout_s": 5.0, "max_retries": 4, "prices": PriceTable(PRICES), **FAST, **options}
    return LLM(model.base_url, "sk-test", **settings)  # type: ignore[arg-type]


def ask(llm: LLM, text: str = "question 7", **options: object):
    return llm.complete([{"role": "user", "content": text}], "priced", **options)  # type: ignore[arg-type]


def test_completion_text_usage_and_cost(model: ScriptedModel) -> None:
    completion = ask(client(model), "question 12345678")
    assert completion.text == "answer 12345678"
    assert completion.model == "priced" and completion.served_model == "priced"
    assert completion.finish_reason == "stop"
    usage = completion.usage
    assert usage.calls == 1
    assert usage.input_tokens == len("question 12345678") // 4 + 1
    assert usage.output_tokens == len("answer 12345678") // 4 + 1
    assert usage.cost_usd == pytest.approx((usage.input_tokens + 2 * usage.output_tokens) / 1e6)
    assert [r.messages for r in model.requests] == [
        [{"role": "user", "content": "question 12345678"}]
    ]


def test_unknown_model_is_free_and_flagged(model: ScriptedModel) -> None:
    llm = client(model)
    completion = llm.complete([{"role": "user", "content": "hi"}], "mystery-model")
    assert completion.usage.cost_usd == 0.0
    assert llm.prices.unpriced == {"mystery-model"}


def test_missing_usage_is_estimated(model: ScriptedModel) -> None:
    model.send_usage = False
    completion = ask(client(model), "x" * 400)
    assert completion.usage.input_tokens == 101
    assert completion.usage.output_tokens == len("answer ?") // 4 + 1
    assert completion.usage.cost_usd > 0


def test_a_429_burst_is_waited_out_honouring_retry_after(model: ScriptedModel) -> None:
    model.inject(Fault(status=429, retry_after=0.15), times=3)
    started = time.monotonic()
    completion = ask(client(model))
    assert completion.text == "answer 7"
    assert time.monotonic() - started >= 0.45
    assert model.received == 4 and len(model.requests) == 1


def test_a_long_retry_after_is_not_waited_for(model: ScriptedModel) -> None:
    model.inject(Fault(status=429, retry_after=30))
    started = time.monotonic()
    with pytest.raises(LLMError, match="retry after 30 s") as e:
        ask(client(model, max_retry_after_s=5))
    assert time.monotonic() - started < 2
    assert e.value.provider_status == 429 and e.value.attempts == 1


def test_server_errors_are_retried(model: ScriptedModel) -> None:
    model.inject(Fault(status=500), Fault(status=503), Fault(status=502))
    assert ask(client(model)).text == "answer 7"
    assert model.received == 4


def test_out_of_retries_is_a_clear_error_with_the_cause(model: ScriptedModel) -> None:
    model.inject(Fault(status=500), times=10)
    with pytest.raises(LLMError) as e:
        ask(client(model, max_retries=2))
    error = e.value
    assert error.attempts == 3 and error.provider_status == 500 and error.model == "priced"
    assert "after 3 tries (out of retries)" in str(error) and "HTTP 500" in str(error)
    assert isinstance(error.__cause__, openai.InternalServerError)
    assert model.received == 3


def test_a_slow_answer_times_out_and_is_retried(model: ScriptedModel) -> None:
    model.inject(Fault(delay_s=3.0))
    started = time.monotonic()
    assert ask(client(model, timeout_s=0.2)).text == "answer 7"
    assert 0.2 <= time.monotonic() - started < 2.5  # not the first attempt's 3 s
    assert model.received == 2


def test_always_slow_ends_in_a_timeout_error(model: ScriptedModel) -> None:
    model.inject(Fault(delay_s=0.4), times=3)
    with pytest.raises(LLMError, match="timed out") as e:
        ask(client(model, timeout_s=0.1, max_retries=1))
    assert isinstance(e.value.__cause__, openai.APITimeoutError)
    assert e.value.provider_status is None


def test_a_dropped_connection_is_retried(model: ScriptedModel) -> None:
    model.inject(Fault(drop=True), Fault(drop=True))
    assert ask(client(model)).text == "answer 7"
    assert model.received == 3


def test_nobody_listening_is_a_connection_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    llm = LLM(f"http://127.0.0.1:{port}/v1", "sk", 1, 1, prices=PriceTable(), **FAST)
    with pytest.raises(LLMError, match="connection failed") as e:
        ask(llm)
    assert isinstance(e.value.__cause__, openai.APIConnectionError)
    assert e.value.attempts == 2


@pytest.mark.parametrize("status", [400, 404, 422])
def test_client_errors_are_not_retried(model: ScriptedModel, status: int) -> None:
    model.inject(Fault(status=status))
    with pytest.raises(LLMError, match="refused") as e:
        ask(client(model))
    assert e.value.provider_status == status and e.value.attempts == 1
    assert model.received == 1


def test_a_wrong_key_is_not_retried(model: ScriptedModel) -> None:
    model.api_key = "sk-right"
    with pytest.raises(LLMError) as e:
        ask(client(model))
    assert e.value.provider_status == 401
    assert model.received == 1
    assert "sk-test" not in str(e.value)


def test_the_deadline_bounds_the_retries(model: ScriptedModel) -> None:
    model.inject(Fault(status=503, retry_after=0.2), times=20)
    started = time.monotonic()
    with pytest.raises(DeadlineReached, match="deadline"):
        ask(client(model, max_retries=20), deadline=started + 0.5)
    # 20 retries would take 4 s; the deadline ends them (the slack is for a loaded machine).
    assert time.monotonic() - started < 2.0
    assert 1 <= model.received <= 3


def test_the_deadline_bounds_a_slow_attempt(model: ScriptedModel) -> None:
    model.inject(Fault(delay_s=5.0))
    started = time.monotonic()
    with pytest.raises(DeadlineReached):
        ask(client(model, timeout_s=30), deadline=started + 0.3)
    assert time.monotonic() - started < 3.0  # not the attempt's 5 s


def test_a_passed_deadline_calls_nothing(model: ScriptedModel) -> None:
    with pytest.raises(DeadlineReached, match="deadline") as e:
        ask(client(model), deadline=time.monotonic() - 1)
    assert e.value.attempts == 0 and model.received == 0


def test_many_threads_share_one_client(model: ScriptedModel) -> None:
    model.latency_s = 0.2
    model.inject(Fault(status=429, retry_after=0.01), times=5)
    llm = client(model)
    answers: dict[int, str] = {}

    def work(i: int) -> None:
        answers[i] = ask(llm, f"question {i}").text

    threads = [threading.Thread(target=work, args=(i,)) for i in range(32)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - started < 3.0  # concurrent, not 32 x 0.2 s
    assert answers == {i: f"answer {i}" for i in range(32)}
    assert model.received == 37


def test_backoff_grows_with_jitter_and_a_cap() -> None:
    backoff = Backoff(max_retries=5, base_s=1.0, max_s=5.0)
    for attempt, cap in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 5.0), (8, 5.0)]:
        waits = [backoff.wait(attempt, None) for _ in range(50)]
        assert all(cap / 2 <= w <= cap for w in waits)
        assert len(set(waits)) > 1
    assert backoff.wait(0, 3.0) == 3.0


def test_model_client_from_settings() -> None:
    """One client per endpoint, every one with the settings' timeout, retries and prices."""
    from functions.infer.routing import Endpoint
    from functions.infer.settings import InferSettings
    from functions.infer.wiring import model_client

    settings = InferSettings(
        api_key="sk",
        base_url="http://127.0.0.1:9/v1",
        model="m",
        llm_timeout_s=7,
        llm_max_retries=2,
        prices_json=PRICES,
        endpoints={"other": Endpoint("http://127.0.0.1:10/v1", "sk2", ("local",))},
    )
    llm = model_client(settings)
    for client in (llm.default, llm.by_model["local"]):
        assert client.timeout_s == 7 and client.backoff.max_retries == 2
        assert client.prices.price("priced") == (1.0, 2.0)
    assert llm.by_model["local"].base_url == "http://127.0.0.1:10/v1"


# ----------------------------------------------------------------------------- output cap


def test_the_output_cap_is_sent_as_max_tokens(model: ScriptedModel) -> None:
    llm = client(model)
    ask(llm, max_tokens=300)
    ask(llm)  # no cap asked: no field sent, the server's own limit holds
    first, second = model.requests
    assert (first.max_tokens, first.max_completion_tokens) == (300, None)
    assert (second.max_tokens, second.max_completion_tokens) == (None, None)


def test_a_reply_cut_at_the_cap_says_so(model: ScriptedModel) -> None:
    model.policy = lambda request: "word " * 400
    model.honour_cap = True
    completion = ask(client(model), max_tokens=20)
    assert completion.finish_reason == "length" and len(completion.text) < 100
    assert completion.usage.output_tokens <= 20


def test_a_model_that_refuses_max_tokens_gets_max_completion_tokens(model: ScriptedModel) -> None:
    """As OpenAI's reasoning models answer 400 to `max_tokens`, naming the other field."""
    model.refused_fields = frozenset({"max_tokens"})
    llm = client(model, max_retries=0)
    assert ask(llm, max_tokens=64).text == "answer 7"
    assert ask(llm, max_tokens=64).text == "answer 7"
    assert model.received == 3  # the refusal once, then the other field from the start
    assert [r.max_completion_tokens for r in model.requests] == [64, 64]
    assert all(r.max_tokens is None for r in model.requests)
    other = llm.complete([{"role": "user", "content": "1"}], "other", max_tokens=64)
    assert other.text == "answer 1"
    assert model.received == 5  # learnt per model: another model is asked the usual way first


def test_a_server_refusing_both_fields_is_an_error_not_a_loop(model: ScriptedModel) -> None:
    model.refused_fields = frozenset({"max_tokens", "max_completion_tokens"})
    with pytest.raises(LLMError, match="refused the request") as e:
        ask(client(model), max_tokens=64)
    assert e.value.provider_status == 400 and model.received == 2


def test_a_timed_out_call_is_asked_again_only_once(model: ScriptedModel) -> None:
    """A stuck local server keeps generating after the client leaves: each retry would queue
    one more generation. Other failures still get every retry."""
    model.inject(Fault(delay_s=0.6), times=5)
    with pytest.raises(LLMError, match="timed out 2 times") as e:
        ask(client(model, timeout_s=0.15, max_retries=4))
    assert isinstance(e.value.__cause__, openai.APITimeoutError)
    assert model.received == 2 and e.value.attempts == 2
    model.reset()
    model.inject(Fault(delay_s=0.6), times=5)
    with pytest.raises(LLMError, match="timed out 1 times"):
        ask(client(model, timeout_s=0.15, timeout_retries=0))
    assert model.received == 1
    model.reset()
    model.inject(Fault(delay_s=0.6), Fault(status=503), Fault(status=503))
    assert ask(client(model, timeout_s=0.3)).text == "answer 7"  # 1 timeout + 2 errors retried
    assert model.received == 4


def test_timeout_retries_setting() -> None:
    from functions.config import ConfigError
    from functions.infer.settings import InferSettings
    from functions.infer.wiring import model_client

    base = {"LLM_API_KEY": "k", "LLM_BASE_URL": "http://127.0.0.1:9/v1", "LLM_MODEL": "m"}
    assert InferSettings.from_env(base, served=False).llm_timeout_retries == 1
    settings = InferSettings.from_env({**base, "LLM_TIMEOUT_RETRIES": "0"}, served=False)
    assert model_client(settings).backoff.timeout_retries == 0
    with pytest.raises(ConfigError, match="LLM_TIMEOUT_RETRIES"):
        InferSettings.from_env({**base, "LLM_TIMEOUT_RETRIES": "-1"}, served=False)

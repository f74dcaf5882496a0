"""Who may spend the operator's model key: API keys, each key's ceilings, the operator's ceilings.

The served tests run infer as a deployment does, with keys from a mounted file; the scripted
model's prices are set high enough that a dollar is a few turns. Nothing refused here may reach
the model: each test checks the model heard nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from functions.config import ConfigError
from functions.errors import Forbidden, TooManyRequests, Unauthorized, Unavailable
from functions.infer.callers import (
    Admission,
    Caller,
    KeyRing,
    StoreCounters,
    digest_of,
    parse_keys,
)
from functions.infer.ledger import MemoryStore, RedisStore
from functions.infer.settings import InferSettings
from functions.local import command
from functions.testing.processes import Served
from functions.testing.redis_server import PASSWORD, RedisServer
from functions.testing.scripted_model import repl, scripted_replies
from tests.conftest import ROOT, free_port, infer_env, serve

NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "ops", "grace", "hank", "ivy")
KEYS = {name: f"rlm-{name}-{uuid.uuid4().hex}" for name in NAMES}
PRICES = {"scripted-root": [300.0, 300.0], "scripted-sub": [300.0, 300.0],
          "priced-other": [1.0, 1.0]}  # fmt: skip
SERVED_MODELS = "scripted-root,scripted-sub,priced-other,unpriced-other"


def key_list(**overrides: dict) -> dict:
    entries = {
        "alice": {"max_run_usd": 0.5, "max_runs": 2},
        "bob": {"revoked": True},
        "carol": {"models": ["scripted-root", "scripted-sub"]},
        "dave": {"max_day_usd": 1.0},
        "erin": {"max_runs": 1},
        "frank": {},
        "ops": {"operator": True, "max_runs": 0},
        "grace": {},
        "hank": {"max_day_usd": 1.0},  # these two for the pods sharing a ledger
        "ivy": {"max_runs": 1},
    }
    entries.update(overrides)
    return {name: {"sha256": digest_of(KEYS[name]), **spec} for name, spec in entries.items()}


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


FINAL = scripted_replies(["FINAL(42)"])
FOREVER = scripted_replies([repl("x = 1")])  # never answers: a run that spends until stopped


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "keys.json"
    path.write_text(json.dumps(key_list()))
    return path


@pytest.fixture(scope="module")
def keyed(stack, scripted_llm, keys_file, tmp_path_factory) -> Iterator[Served]:
    """infer with callers' keys from a file, priced models and ceilings, as deployed."""
    port = free_port()
    env = infer_env(scripted_llm, stack.execute.url, port, INFER_AUTH="keys",
                    INFER_API_KEYS_FILE=str(keys_file), LLM_PRICES=json.dumps(PRICES),
                    INFER_MODELS=SERVED_MODELS, INFER_MAX_BUDGET_USD="5",
                    INFER_DEFAULT_BUDGET_USD="1", INFER_MAX_TIMEOUT="120")  # fmt: skip
    served = serve("infer", env, tmp_path_factory.mktemp("keyed"), port=port)
    yield served
    served.stop()


def infer(served: Served, body: dict, who: str | None = "frank", **kw) -> httpx.Response:
    headers = {**(auth(who) if who else {}), **kw.pop("headers", {})}
    return httpx.post(served.url + "/infer", json=body, headers=headers, timeout=120, **kw)


ASK = {"query": "What is it?", "context": "c"}


class Running:
    """A run started in the background, once the model has heard from it; `.response` after
    `join`."""

    def __init__(self, served: Served, body: dict, who: str, llm) -> None:
        self.response: httpx.Response | None = None
        self._thread = threading.Thread(target=self._run, args=(served, body, who))
        self._thread.start()
        deadline = time.monotonic() + 30
        while not llm.requests and time.monotonic() < deadline:
            time.sleep(0.02)

    def _run(self, served: Served, body: dict, who: str) -> None:
        self.response = infer(served, body, who)

    def join(self) -> httpx.Response:
        self._thread.join(60)
        assert self.response is not None
        return self.response


# ------------------------------------------------------------------------------ keys


def test_a_known_key_runs(keyed, llm):
    llm.switch.current = FINAL
    r = infer(keyed, ASK, "frank")
    assert r.status_code == 200, r.text
    assert r.json()["answer"] == "42"


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "needs an API key"),
        ("", "needs an API key"),
        ("Basic YWxpY2U6eA==", "malformed"),
        ("Bearer", "malformed"),
        ("Bearer a b", "malformed"),
        ("Bearer " + "k" * 600, "malformed"),
        ("Bearer key\u00e9", "malformed"),
        ("Bearer rlm-nobody-0123456789", "unknown API key"),
        (lambda: f"Bearer {KEYS['alice']}x", "unknown API key"),
        (lambda: f"bearer {KEYS['bob']}", "'bob' was revoked"),
    ],
)
def test_a_missing_malformed_unknown_or_revoked_key_is_401_before_any_model_call(
    keyed, llm, header, reason
):
    header = header() if callable(header) else header
    headers = {} if header is None else {"Authorization": header.encode("utf-8")}
    r = httpx.post(keyed.url + "/infer", json=ASK, headers=headers, timeout=30)
    assert r.status_code == 401, r.text
    assert reason in r.json()["error"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert llm.requests == []


def test_every_public_route_needs_a_key(keyed, llm):
    event = {"ce-specversion": "1.0", "ce-type": "dev.rlm.infer.requested", "ce-source": "/t",
             "ce-id": "no-key-1", "content-type": "application/json"}  # fmt: skip
    chat = {"model": "rlm", "messages": [{"role": "user", "content": "hi"}]}
    answers = [
        httpx.post(keyed.url + "/infer", json=ASK, timeout=30),
        httpx.post(keyed.url + "/", json=ASK, timeout=30),
        httpx.post(keyed.url + "/infer", json=ASK, headers={"accept": "text/event-stream"}),
        httpx.post(keyed.url + "/v1/chat/completions", json=chat, timeout=30),
        httpx.post(keyed.url + "/infer/some-run/cancel", timeout=30),
        httpx.post(keyed.url + "/", content=json.dumps(ASK), headers=event, timeout=30),
        httpx.get(keyed.url + "/metrics", timeout=30),
        httpx.get(keyed.url + "/openapi.json", timeout=30),
    ]
    assert [r.status_code for r in answers] == [401] * len(answers)
    assert httpx.get(keyed.url + "/health", timeout=30).status_code == 200
    assert llm.requests == []


def test_metrics_and_openapi_are_for_operator_keys(keyed):
    assert httpx.get(keyed.url + "/metrics", headers=auth("frank")).status_code == 403
    r = httpx.get(keyed.url + "/metrics", headers=auth("ops"))
    assert r.status_code == 200 and "rlm_inference_requests_total" in r.text
    assert httpx.get(keyed.url + "/openapi.json", headers=auth("frank")).status_code == 403
    document = httpx.get(keyed.url + "/openapi.json", headers=auth("ops")).json()
    assert document["security"] == [{"apiKey": []}]
    assert document["paths"]["/health"]["get"]["security"] == []


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_a_keyed_infer_conforms_to_its_document(keyed, llm, mode):
    """Schemathesis with a caller's key: documented answers only, and (its ignored_auth check)
    a 401 for each operation sent without the key."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    llm.switch.current = FINAL
    schema = schemathesis.openapi.from_url(keyed.url + "/openapi.json", headers=auth("ops"))

    @given(case=schema.as_strategy(GenerationMode(mode)))
    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)  # fmt: skip
    def check(case) -> None:
        if isinstance(case.body, dict) and type(case.body.get("max_iterations")) is int:
            case.body["max_iterations"] = min(case.body["max_iterations"], 2)
        case.call_and_validate(headers=auth("frank"), timeout=60,
                               excluded_checks=[positive_data_acceptance])  # fmt: skip

    check()


def test_an_operator_key_without_runs_starts_none(keyed, llm):
    r = infer(keyed, ASK, "ops")
    assert r.status_code == 403 and "may not start runs" in r.json()["error"]
    assert llm.requests == []


def test_an_openai_client_with_a_key(keyed, llm):
    import openai

    llm.switch.current = FINAL
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEYS["frank"], max_retries=0)
    reply = client.chat.completions.create(
        model="rlm", messages=[{"role": "user", "content": "What is it?"}]
    )
    assert reply.choices[0].message.content == "42"
    wrong = openai.OpenAI(base_url=keyed.url + "/v1", api_key="sk-not-ours", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="rlm", messages=[{"role": "user", "content": "q"}])
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.chat.completions.create(
            model="totally-unknown-model", messages=[{"role": "user", "content": "q"}]
        )
    assert "INFER_MODELS" in refused.value.response.json()["error"]["message"]  # OpenAI shape


def test_cloudevents_carry_the_key_in_an_extension_attribute(keyed, llm):
    llm.switch.current = FINAL

    def send(event_id: str, key: str | None, structured: bool = False) -> httpx.Response:
        if structured:
            event = {"specversion": "1.0", "type": "dev.rlm.infer.requested", "source": "/t",
                     "id": event_id, "datacontenttype": "application/json",
                     "data": ASK}  # fmt: skip
            if key:
                event["rlmkey"] = key
            headers = {"content-type": "application/cloudevents+json"}
            return httpx.post(keyed.url + "/", content=json.dumps(event), headers=headers)
        headers = {"ce-specversion": "1.0", "ce-type": "dev.rlm.infer.requested",
                   "ce-source": "/t", "ce-id": event_id,
                   "content-type": "application/json"}  # fmt: skip
        if key:
            headers["ce-rlmkey"] = key
        return httpx.post(keyed.url + "/", content=json.dumps(ASK), headers=headers, timeout=60)

    first = f"event-{uuid.uuid4().hex[:8]}"
    assert send(first, None).status_code == 401
    assert send(first, "rlm-wrong-key").status_code == 401
    assert llm.requests == []
    r = send(first, KEYS["frank"])
    assert r.status_code == 200 and r.headers["ce-type"] == "dev.rlm.infer.completed"
    assert "rlmkey" not in {k.lower().removeprefix("ce-") for k in r.headers}
    assert json.loads(r.content)["answer"] == "42"
    calls = len(llm.requests)
    assert send(first, KEYS["frank"]).status_code == 200 and len(llm.requests) == calls
    # the same id from another key is another caller's event: run, not served from memory
    assert send(first, KEYS["grace"], structured=True).status_code == 200
    assert len(llm.requests) > calls
    r = send(f"event-{uuid.uuid4().hex[:8]}", KEYS["bob"], structured=True)
    assert r.status_code == 401 and "revoked" in r.json()["error"]


def test_only_the_owner_cancels_a_run(keyed, llm):
    llm.switch.current = FOREVER
    llm.latency_s = 0.3
    run_id = f"owned-{uuid.uuid4().hex[:8]}"
    running = Running(keyed, {**ASK, "run_id": run_id, "max_budget_usd": 4}, "frank", llm)
    cancel = keyed.url + f"/infer/{run_id}/cancel"
    assert httpx.post(cancel, headers=auth("alice")).status_code == 404
    assert httpx.post(cancel, headers=auth("frank")).status_code == 202
    done = running.join()
    assert done.json()["stop_reason"] == "cancelled", done.text


# ------------------------------------------------------------------------------ ceilings


@pytest.mark.parametrize(
    ("field", "value", "setting"),
    [
        ("max_iterations", 7, "MAX_ITERATIONS"),
        ("max_depth", 3, "MAX_DEPTH"),
        ("max_budget_usd", 5.01, "INFER_MAX_BUDGET_USD"),
        ("max_timeout_s", 121, "INFER_MAX_TIMEOUT"),
        ("model", "totally-unknown-model", "INFER_MODELS"),
        ("sub_model", "totally-unknown-model", "INFER_MODELS"),
        ("models", ["scripted-root", "gpt-expensive"], "INFER_MODELS"),
        ("models", ["unpriced-other"], "no price"),
        ("model", "unpriced-other", "no price"),
    ],
)
def test_operator_ceilings_refuse_with_the_setting_named(keyed, llm, field, value, setting):
    r = infer(keyed, {**ASK, field: value}, "frank")
    assert r.status_code == 422, r.text
    assert setting in r.json()["error"]
    assert llm.requests == []


def test_a_run_without_a_budget_gets_the_default_one(keyed, llm):
    llm.switch.current = FOREVER
    r = infer(keyed, ASK, "frank")
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["stop_code"] == "max_budget_usd" and "of $1" in result["stop_reason"], result


def test_the_keys_run_ceiling(keyed, llm):
    r = infer(keyed, {**ASK, "max_budget_usd": 0.6}, "alice")
    assert r.status_code == 403 and "ceiling of $0.5 per run" in r.json()["error"]
    assert llm.requests == []
    llm.switch.current = FOREVER
    r = infer(keyed, ASK, "alice")  # the default budget is $1: the key's ceiling is lower
    assert r.status_code == 200, r.text
    assert r.json()["stop_code"] == "max_budget_usd" and "of $0.5" in r.json()["stop_reason"]


def test_the_keys_models(keyed, llm):
    r = infer(keyed, {**ASK, "models": ["priced-other"]}, "carol")
    assert r.status_code == 403 and "may not use model 'priced-other'" in r.json()["error"]
    assert llm.requests == []
    llm.switch.current = FINAL
    assert infer(keyed, {**ASK, "models": ["priced-other"]}, "frank").status_code == 200


def spends_part_of_its_day(served: Served, llm, name: str) -> float:
    """Run once with the whole day's $1 as the budget: what it spent (some, not all: a model
    call is made only when the budget covers its worst case)."""
    llm.switch.current = FOREVER
    r = infer(served, {**ASK, "max_budget_usd": 1.0}, name)
    assert r.status_code == 200, r.text
    spent = r.json()["total_cost_usd"]
    assert r.json()["stop_code"] == "max_budget_usd" and 0 < spent <= 1.0, r.text
    return spent


def test_the_keys_day_ceiling(keyed, llm):
    r = infer(keyed, {**ASK, "max_budget_usd": 2}, "dave")
    assert r.status_code == 429 and "has $1.0000 of its $1 left today" in r.json()["error"]
    assert 0 < int(r.headers["retry-after"]) <= 86400
    spent = spends_part_of_its_day(keyed, llm, "dave")
    llm.requests.clear()
    r = infer(keyed, {**ASK, "max_budget_usd": 1.0}, "dave")  # what it did not spend came back
    assert r.status_code == 429 and f"has ${1 - spent:.4f} of its $1 left" in r.json()["error"]
    assert llm.requests == []


def test_the_keys_runs_at_once(keyed, llm):
    llm.switch.current = FINAL
    llm.latency_s = 1.5
    first = Running(keyed, ASK, "erin", llm)
    r = infer(keyed, ASK, "erin")
    assert r.status_code == 429 and "1 runs in progress" in r.json()["error"]
    assert int(r.headers["retry-after"]) > 0
    assert infer(keyed, ASK, "frank").status_code == 200  # another key is not held up
    assert first.join().status_code == 200
    llm.latency_s = 0.0
    assert infer(keyed, ASK, "erin").status_code == 200  # the first run's place is free again


def test_a_changed_key_file_is_read_again(keyed, keys_file, llm):
    llm.switch.current = FINAL
    original = keys_file.read_text()
    try:
        keys_file.write_text(json.dumps(key_list(grace={"revoked": True})))
        r = infer(keyed, ASK, "grace")
        assert r.status_code == 401 and "revoked" in r.json()["error"]
        keys_file.write_text("{not json")
        r = infer(keyed, ASK, "frank")
        assert r.status_code == 503 and "Retry-After" in r.headers
    finally:
        keys_file.write_text(original)
    assert infer(keyed, ASK, "grace").status_code == 200


# ------------------------------------------------------------------------------ two pods


@pytest.fixture(scope="module")
def two_pods(stack, scripted_llm, keys_file, redis, tmp_path_factory) -> Iterator[list[Served]]:
    """Two keyed infer processes sharing one Redis ledger, as two pods of a deployment."""
    tmp = tmp_path_factory.mktemp("pods")
    pods = []
    for _ in range(2):
        port = free_port()
        env = infer_env(scripted_llm, stack.execute.url, port, INFER_AUTH="keys",
                        INFER_API_KEYS_FILE=str(keys_file), LLM_PRICES=json.dumps(PRICES),
                        INFER_STORE_URL=redis.url, INFER_STORE_PASSWORD=PASSWORD)  # fmt: skip
        pods.append(serve("infer", env, tmp, port=port))
    yield pods
    for pod in pods:
        pod.stop()


def test_a_keys_day_is_counted_across_pods(two_pods, llm):
    a, b = two_pods
    spent = spends_part_of_its_day(a, llm, "hank")
    llm.requests.clear()
    r = infer(b, {**ASK, "max_budget_usd": 1.0}, "hank")
    assert r.status_code == 429 and f"has ${1 - spent:.4f} of its $1 left" in r.json()["error"]
    assert llm.requests == []


def test_a_keys_runs_at_once_are_counted_across_pods(two_pods, llm):
    a, b = two_pods
    llm.switch.current = FINAL
    llm.latency_s = 1.5
    first = Running(a, ASK, "ivy", llm)
    r = infer(b, ASK, "ivy")
    assert r.status_code == 429 and "1 runs in progress" in r.json()["error"]
    assert first.join().status_code == 200
    llm.latency_s = 0.0
    assert infer(b, ASK, "ivy").status_code == 200


# ------------------------------------------------------------------------------ starting


def _start(env: dict[str, str], tmp: Path) -> tuple[subprocess.Popen, Path]:
    port = free_port()
    log = tmp / f"infer-{port}.log"
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    for name in [n for n in full if n.startswith("INFER_API_KEYS")]:
        if name not in env:
            del full[name]
    process = subprocess.Popen(command("infer", "127.0.0.1", port), cwd=ROOT, env=full,
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)  # fmt: skip
    return process, log


def test_a_served_infer_without_keys_starts_only_with_auth_none(stack, scripted_llm, tmp_path):
    env = infer_env(scripted_llm, stack.execute.url, free_port())
    del env["INFER_AUTH"]
    process, log = _start(env, tmp_path)
    assert process.wait(60) != 0
    assert "INFER_API_KEYS_FILE" in log.read_text() and "INFER_AUTH=none" in log.read_text()
    absent = str(tmp_path / "absent.json")
    for bad, words in [({"INFER_AUTH": "none", "INFER_API_KEYS": "{}"}, "choose one"),
                       ({"INFER_AUTH": "maybe"}, "INFER_AUTH"),
                       ({"INFER_API_KEYS_FILE": absent}, "absent.json")]:  # fmt: skip
        process, log = _start({**env, **bad}, tmp_path)
        assert process.wait(60) != 0 and words in log.read_text(), log.read_text()
    port = free_port()
    served = serve("infer", {**env, "INFER_AUTH": "none"}, tmp_path, port=port)
    try:
        assert httpx.post(served.url + "/infer", json={"query": "q", "run_id": "x" * 65},
                          timeout=30).status_code == 422  # fmt: skip
        assert "INFER_AUTH=none" in served.output() and "WARNING" in served.output().upper()
    finally:
        served.stop()


def test_metrics_for_peers_in_the_metrics_ranges(stack, scripted_llm, keys_file, tmp_path):
    port = free_port()
    env = infer_env(scripted_llm, stack.execute.url, port, INFER_AUTH="keys",
                    INFER_API_KEYS_FILE=str(keys_file),
                    INFER_METRICS_CIDRS="127.0.0.0/8")  # fmt: skip
    served = serve("infer", env, tmp_path, port=port)
    try:
        assert httpx.get(served.url + "/metrics").status_code == 200
        assert httpx.get(served.url + "/openapi.json").status_code == 200
        assert httpx.post(served.url + "/infer", json=ASK).status_code == 401
    finally:
        served.stop()


# ------------------------------------------------------------------------------ the parts


def test_the_key_list_is_checked_at_start():
    good = {"sha256": "a" * 64}
    for bad, words in [
        ("[]", "JSON object"),
        ("{", "not JSON"),
        (json.dumps({"bad name!": good}), "key name"),
        (json.dumps({"anonymous": good}), "not be 'anonymous'"),
        (json.dumps({"a": {"sha256": "xyz"}}), "sha256"),
        (json.dumps({"a": {**good, "max_run_usd": -1}}), "max_run_usd"),
        (json.dumps({"a": {**good, "max_runs": "4"}}), "max_runs"),
        (json.dumps({"a": {**good, "operatr": True}}), "operatr"),
        (json.dumps({"a": good, "b": good}), "listed twice"),
    ]:
        with pytest.raises(ConfigError, match=words):
            parse_keys(bad, "INFER_API_KEYS")


def test_a_key_is_compared_by_its_digest():
    ring = KeyRing(json.dumps({"a": {"sha256": digest_of("secret-a")}}))
    assert ring.authenticate("Bearer secret-a").name == "a"
    assert ring.authenticate("BEARER  secret-a ".replace("  ", " ")).name == "a"
    for header in ("Bearer SECRET-A", "Bearer secret-a=x", "Token secret-a", "secret-a"):
        with pytest.raises(Unauthorized):
            ring.authenticate(header)


def test_an_unreadable_key_file_refuses_everyone_until_fixed(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"a": {"sha256": digest_of("k")}}))
    ring = KeyRing(path=str(path))
    assert ring.authenticate("Bearer k").name == "a"
    path.write_text('{"a": {"sha256": "short"}}')
    with pytest.raises(Unavailable):
        ring.authenticate("Bearer k")
    path.write_text(json.dumps({"b": {"sha256": digest_of("k")}}))
    assert ring.authenticate("Bearer k").name == "b"


@pytest.fixture(scope="module")
def redis(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        return MemoryStore()
    redis = request.getfixturevalue("redis")
    store = RedisStore(redis.url, PASSWORD)
    store._redis.flushdb()
    return store


def test_counters_charge_within_a_limit_and_give_back(store):
    counters = StoreCounters(store)
    assert counters.charge("a", 0.6, limit=1.0)
    assert not counters.charge("a", 0.6, limit=1.0)
    assert counters.charge("a", -0.5)  # a refund is never refused
    assert counters.charge("a", 0.6, limit=1.0)
    assert counters.spent_today("a") == pytest.approx(0.7)
    assert counters.spent_today("b") == 0.0
    assert counters.charge("a", 5.0, day="1999-12-31") and counters.spent_today("a") < 1


def test_counters_hold_runs_until_released_or_their_time_runs_out(store):
    counters = StoreCounters(store)
    assert counters.acquire_run("a", "r1", 1, 60)
    assert counters.acquire_run("a", "r1", 1, 60)  # the same run again is no second place
    assert not counters.acquire_run("a", "r2", 1, 60)
    assert counters.acquire_run("b", "r2", 1, 60)  # another key's places are its own
    counters.release_run("a", "r1")
    counters.release_run("a", "r1")  # twice is no error
    assert counters.acquire_run("a", "r2", 1, 0.2)
    assert not counters.acquire_run("a", "r3", 1, 60)
    time.sleep(0.3)  # the place of a run whose pod died goes by itself
    assert counters.acquire_run("a", "r3", 1, 60)


def test_admission_reserves_the_day_and_settles_what_was_spent():
    counters = StoreCounters(MemoryStore())
    admission = Admission(counters)
    dave = Caller("dave", max_day_usd=1.0, max_run_usd=0.8, max_runs=1)
    ticket = admission.admit(dave, "r1", ["m"], None, 2.0, 60)
    assert ticket.budget_usd == 0.8 and counters.spent_today("dave") == 0.8
    with pytest.raises(TooManyRequests, match="runs in progress"):
        admission.admit(dave, "r2", ["m"], None, 2.0, 60)
    assert counters.spent_today("dave") == pytest.approx(0.8)  # the refused one gave it back
    ticket.settle(0.25)
    ticket.settle(0.25)  # once only
    assert counters.spent_today("dave") == pytest.approx(0.25)
    ticket = admission.admit(dave, "r2", ["m"], None, 2.0, 60)
    assert ticket.budget_usd == 0.75  # what is left of the day, under the run ceiling
    with pytest.raises(Forbidden, match="per run"):
        admission.admit(dave, "r3", ["m"], 0.9, 0.9, 60)
    ticket.settle(0.75)
    with pytest.raises(TooManyRequests, match="spent its") as refused:
        admission.admit(dave, "r4", ["m"], None, 2.0, 60)
    assert 0 < int(refused.value.headers["Retry-After"]) <= 86400
    with pytest.raises(Forbidden, match="may not use model"):
        admission.admit(Caller("c", models=frozenset({"m"})), "r5", ["m", "n"], None, None, 60)


BASE_ENV = {"LLM_API_KEY": "k", "LLM_BASE_URL": "http://127.0.0.1:9/v1", "LLM_MODEL": "gpt-4o",
            "WASM_SERVICE_URL": "http://127.0.0.1:9", "RLM_TOKEN_KEY": "k" * 32,
            "INFER_API_KEYS": json.dumps({"a": {"sha256": "a" * 64}})}  # fmt: skip


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"INFER_API_KEYS": ""}, "no API keys"),
        ({"INFER_AUTH": "none"}, "choose one"),
        ({"INFER_DEFAULT_BUDGET_USD": "11"}, "INFER_DEFAULT_BUDGET_USD=11.0 is above"),
        ({"LLM_MODEL": "my-local-model"}, "LLM_MODEL=my-local-model has no price"),
        ({"LLM_SUB_MODEL": "my-local-model"}, "LLM_SUB_MODEL=my-local-model has no price"),
        ({"INFER_METRICS_CIDRS": "10.0.0.0/33"}, "INFER_METRICS_CIDRS"),
        ({"RLM_TOOL_URL_PREFIXES": "https://a@b/"}, "RLM_TOOL_URL_PREFIXES"),
        ({"INFER_ALLOW_UNPRICED": "perhaps"}, "INFER_ALLOW_UNPRICED"),
    ],
)
def test_served_settings_refuse_to_start(env, words):
    with pytest.raises(ConfigError, match=words):
        InferSettings.from_env({**BASE_ENV, **env})


def test_served_settings_defaults():
    s = InferSettings.from_env({**BASE_ENV, "LLM_SUB_MODEL": "gpt-4o-mini"})
    assert (s.auth, s.max_budget_usd, s.default_budget_usd, s.max_timeout_s) == (
        "keys", 10.0, 1.0, 3600.0)  # fmt: skip
    assert s.models == ("gpt-4o", "gpt-4o-mini") and s.allow_unpriced is False
    local_env = {"INFER_API_KEYS": "", "INFER_AUTH": "none", "LLM_MODEL": "my-local-model",
                 "INFER_MODELS": "*"}  # fmt: skip
    local = InferSettings.from_env({**BASE_ENV, **local_env})
    assert local.allow_unpriced is True and local.models is None
    embedded = InferSettings.from_env({**BASE_ENV, "INFER_API_KEYS": ""}, served=False)
    assert embedded.max_budget_usd is None and embedded.models is None

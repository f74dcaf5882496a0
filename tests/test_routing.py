"""Model routing: an allowlist, a default per depth, several OpenAI-compatible endpoints."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from functions.config import ConfigError
from functions.infer.routing import default_model, parse_endpoints
from functions.sdk import RLM
from functions.testing.scripted_model import ScriptedModel, repl, scripted_replies
from tests.conftest import free_port, infer_env, serve


def echo_model(request) -> str:
    """A second endpoint: says which model answered."""
    if request.is_root:  # a child RLM running on this endpoint
        return repl(f"FINAL('child on {request.model}')")
    return f"{request.model} says hi"


@pytest.fixture(scope="module")
def other() -> Iterator[ScriptedModel]:
    model = ScriptedModel(echo_model).start()
    yield model
    model.stop()


@pytest.fixture(scope="module")
def routed_infer(stack, scripted_llm, other, tmp_path_factory):
    """An infer process whose `other-*` models live on a second endpoint."""
    port = free_port()
    endpoints = {"other": {"base_url": other.base_url, "api_key_env": "OTHER_KEY",
                           "models": ["other-sub", "other-big"]}}  # fmt: skip
    env = infer_env(scripted_llm, stack.execute.url, port,
                    RLM_ENDPOINTS=json.dumps(endpoints), OTHER_KEY="k2")  # fmt: skip
    served = serve("infer", env, tmp_path_factory.mktemp("routed"), port=port)
    yield served
    served.stop()


ROUTED_CELL = """
import json
def attempt(model):
    try:
        return llm_query('hi', model=model)
    except SubcallError as e:
        return str(e)
out = [llm_query('hi'), attempt('other-big'), attempt('scripted-root'), attempt('gpt-evil')]
answer.update(content=json.dumps(out), ready=True)
"""


def test_sub_calls_routed_to_a_second_endpoint_by_model(routed_infer, llm, other):
    llm.switch.current = scripted_replies([repl(ROUTED_CELL)], lambda r: f"main {r.model}")
    body = {"query": "q", "context": "c", "sub_model": "other-sub", "models": ["other-big"]}
    r = httpx.post(routed_infer.url + "/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    result = r.json()
    default, big, root, refused = json.loads(result["answer"])
    assert default == "other-sub says hi" and big == "other-big says hi"
    assert root == "main scripted-root"
    assert "'gpt-evil' is not allowed" in refused
    assert "allowed: scripted-root, other-sub, other-big" in refused
    usage = result["usage"]
    assert usage["scripted-root"]["calls"] == 2  # the root turn and one sub-call
    assert usage["other-sub"]["calls"] == 1 and usage["other-big"]["calls"] == 1
    assert "gpt-evil" not in usage


def test_embedded_endpoints_and_models_by_depth(llm, other):
    """A child RLM at depth 1 runs on the model set for depth 1, on its own endpoint."""
    llm.switch.current = scripted_replies([repl("FINAL(rlm_query('go'))")])
    with RLM({"base_url": llm.base_url, "api_key": "k", "model_name": "scripted-root"},
             max_depth=1, models_by_depth={1: "other-d1"},
             endpoints={"o": {"base_url": other.base_url, "api_key": "k2",
                              "models": ["other-d1"]}}) as rlm:  # fmt: skip
        result = rlm.completion("ctx", root_prompt="q")
    assert result.response == "child on other-d1"
    assert result.usage["other-d1"].calls == 1


def test_official_other_backend_kwargs_serve_the_sub_model(llm, other):
    llm.switch.current = scripted_replies([repl("FINAL(llm_query('x'))")])
    sub = {"model_name": "other-sub", "base_url": other.base_url, "api_key": "k2"}
    main = {"base_url": llm.base_url, "api_key": "k", "model_name": "scripted-root"}
    with RLM(main, other_backends=["openai"], other_backend_kwargs=[sub]) as rlm:
        result = rlm.completion("ctx", root_prompt="q")
    assert result.response == "other-sub says hi"


def test_endpoint_settings_fail_clearly():
    with pytest.raises(ConfigError, match="api_key_env must name a set variable"):
        parse_endpoints('{"x": {"base_url": "http://a", "models": ["m"]}}', {})
    with pytest.raises(ConfigError, match="needs models"):
        parse_endpoints('{"x": {"base_url": "http://a", "api_key_env": "K"}}', {"K": "k"})
    with pytest.raises(ConfigError, match="not JSON"):
        parse_endpoints("{", {})


def test_default_model_per_depth():
    assert default_model(0, "root", "sub", {1: "d1"}) == "d1"
    assert default_model(1, "root", "sub", {1: "d1"}) == "sub"
    assert default_model(1, "root", None, {}) == "root"


def test_models_by_depth_arrive_over_json_with_string_keys(stack, llm):
    """JSON object keys are strings: {"1": "m"} is depth 1, and a key that is no depth is 422."""
    import httpx

    body = {"query": "What is the magic number?", "context": "the magic number is 6",
            "models_by_depth": {"1": "scripted-sub"}}  # fmt: skip
    r = httpx.post(stack.infer.url + "/infer", json=body, timeout=120)
    assert r.status_code == 200 and r.json()["answer"] == "6", r.text
    for bad in ({"one": "m"}, {"0": "m"}, {"1.5": "m"}):
        r = httpx.post(
            stack.infer.url + "/infer", json={**body, "models_by_depth": bad}, timeout=30
        )
        assert r.status_code == 422 and "models_by_depth" in r.text, r.text

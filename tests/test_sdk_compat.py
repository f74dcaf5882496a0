"""The official `rlm` library's users at home: its README's examples run with only the import
changed, its backend and environment names are understood (or refused clearly), its result and
usage summary have its fields, and a stop can raise its typed errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from functions import (
    IterationLimitError,
    LimitExceeded,
    RLMError,
    TokenLimitExceededError,
)
from functions.config import ConfigError
from functions.sdk import RLM
from functions.sdk_options import OFFICIAL_ENVIRONMENTS, backend_settings
from functions.testing.scripted_model import never_answers, repl, scripted_replies
from tests.conftest import ROOT

# The official README's examples, as they are written there (alexzhang13/rlm, README.md).
QUICKSTART = """
from rlm import RLM

rlm = RLM(
    backend="openai",
    backend_kwargs={"model_name": "gpt-5-nano"},
    verbose=True,  # For printing to console with rich, disabled by default.
)

print(rlm.completion("Print me the first 100 powers of two, each on a newline.").response)
"""
LOGGER = """
from rlm.logger import RLMLogger
from rlm import RLM

logger = RLMLogger(log_dir="./logs")
rlm = RLM(..., logger=logger)
"""
# The one change: where RLM (and RLMLogger) are imported from.
IMPORTS = {
    "from rlm import RLM": "from functions import RLM",
    "from rlm.logger import RLMLogger": "from functions.sdk import RLMLogger",
}
POWERS = "\n".join(str(2**i) for i in range(100))


def at_home(example: str) -> str:
    for official, ours in IMPORTS.items():
        example = example.replace(official, ours)
    return example


def official_env(model) -> dict[str, str]:
    """The environment an official user has: an OpenAI key and, for a local server, its URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "OPENAI_"))}
    return {**env, "OPENAI_BASE_URL": model.base_url, "OPENAI_API_KEY": "sk-official",
            "LLM_PRICES": json.dumps({"gpt-5-nano": [0.05, 0.4]})}  # fmt: skip


def powers_of_two(request) -> str:
    """A root that reads the task in `context` and does it."""
    if request.turn == 0:
        return repl("print(context)")
    if "powers of two" in request.last:
        return repl(
            "answer['content'] = '\\n'.join(str(2**i) for i in range(100))\nanswer['ready'] = True"
        )
    return "FINAL(I do not know the task)"


def test_the_quickstart_runs_with_only_the_import_changed(llm):
    llm.switch.current = scripted_replies([powers_of_two])
    code = at_home(QUICKSTART)
    assert code.count("from functions") == 1 and "rlm.completion(" in code
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=official_env(llm),
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == POWERS + "\n"
    assert "turn 2" in done.stderr  # verbose=True: progress lines on stderr
    assert {r.model for r in llm.requests} == {"gpt-5-nano"}  # its model, on its endpoint


def test_the_logger_example_with_only_the_imports_changed(llm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, value in official_env(llm).items():
        monkeypatch.setenv(name, value)
    for name in [n for n in os.environ if n.startswith("LLM_") and n != "LLM_PRICES"]:
        monkeypatch.delenv(name)
    llm.switch.current = scripted_replies([powers_of_two])
    code = at_home(LOGGER).replace(
        "RLM(...,", 'RLM(backend="openai", backend_kwargs={"model_name": "gpt-5-nano"},'
    )
    space: dict = {}
    exec(code, space)
    with space["rlm"] as rlm:
        result = rlm.completion("Print me the first 100 powers of two, each on a newline.")
    logger = space["logger"]
    assert result.response == POWERS
    [log] = list((tmp_path / "logs").iterdir())
    assert log.name.startswith("rlm_") and log.suffix == ".jsonl"
    written = [json.loads(line) for line in log.read_text().splitlines()]
    assert written[0]["kind"] == "run" and written[-1]["kind"] == "final"
    assert logger.get_trajectory() == written == result.metadata["trajectory"]


def test_the_result_has_the_official_fields(llm):
    llm.switch.current = scripted_replies([powers_of_two])
    context = "Print me the first 100 powers of two, each on a newline."
    with RLM(backend="openai", backend_kwargs={"model_name": "gpt-5-nano", "api_key": "k",
                                               "base_url": llm.base_url}) as rlm:  # fmt: skip
        result = rlm.completion(context)
    assert result.root_model == "gpt-5-nano" and result.prompt == context
    assert result.response == POWERS and result.error is None and result.execution_time > 0
    summary = result.usage_summary.model_usage_summaries["gpt-5-nano"]
    assert summary.total_calls == 2 and summary.total_input_tokens > summary.total_output_tokens
    usage = result.usage_summary.to_dict()
    assert set(usage) == {"model_usage_summaries", "total_cost"}
    assert set(usage["model_usage_summaries"]["gpt-5-nano"]) == {
        "total_calls", "total_input_tokens", "total_output_tokens", "total_cost",
    }  # fmt: skip
    assert usage["total_cost"] == pytest.approx(result.metadata["total_cost_usd"], abs=1e-6)
    assert result.usage_summary.total_input_tokens == summary.total_input_tokens
    whole = result.to_dict()
    assert whole["response"] == POWERS and whole["usage_summary"] == usage
    json.dumps(whole, default=str)
    assert result.status == "completed" and result.stop_code is None
    assert result.raise_for_status() is result


@pytest.mark.parametrize("name", OFFICIAL_ENVIRONMENTS)
def test_the_official_environments_run_in_the_sandbox(llm, capsys, name):
    probe = (
        "import os\ntry:\n    os.listdir('/etc')\nexcept OSError as e:\n    FINAL(type(e).__name__)"
    )
    llm.switch.current = scripted_replies([repl(probe)])
    kwargs = {"image": "python:3.11-slim"} if name == "docker" else {}
    with RLM({"base_url": llm.base_url, "model_name": "m"}, environment=name,
             environment_kwargs=kwargs) as rlm:  # fmt: skip
        line = capsys.readouterr().err.strip()
        assert line.startswith(f"rlm: environment={name!r}: the model's code runs in this")
        assert "WebAssembly sandbox" in line and len(line.splitlines()) == 1
        assert ("environment_kwargs are not used" in line) == bool(kwargs)
        if name in ("local", "docker"):  # the host's files are not there
            assert rlm.completion("x").response == "FileNotFoundError"


def test_backends_that_speak_the_openai_api_are_mapped(monkeypatch):
    env = {"OPENAI_API_KEY": "sk-o", "OPENROUTER_API_KEY": "sk-r", "AI_GATEWAY_API_KEY": "sk-v",
           "LLM_BASE_URL": "http://ours/v1", "LLM_API_KEY": "sk-ours"}  # fmt: skip
    model = {"model_name": "m"}
    assert backend_settings("openai", model, env) == {
        "LLM_BASE_URL": "https://api.openai.com/v1", "LLM_API_KEY": "sk-o", "LLM_MODEL": "m"
    }  # fmt: skip
    assert (
        backend_settings("openai", model, {**env, "OPENAI_BASE_URL": "http://l/v1"})["LLM_BASE_URL"]
        == "http://l/v1"
    )
    router = backend_settings("openrouter", model, env)
    assert router["LLM_BASE_URL"] == "https://openrouter.ai/api/v1"
    assert router["LLM_API_KEY"] == "sk-r"
    vercel = backend_settings("vercel", model, env)
    assert (vercel["LLM_BASE_URL"], vercel["LLM_API_KEY"]) == (
        "https://ai-gateway.vercel.sh/v1", "sk-v"
    )  # fmt: skip
    given = {"model_name": "m", "base_url": "http://vllm:8000/v1", "api_key": "x"}
    assert backend_settings("vllm", given, env)["LLM_BASE_URL"] == "http://vllm:8000/v1"
    assert backend_settings("openrouter", given, env)["LLM_API_KEY"] == "x"  # given wins
    # Without backend=, this project's own settings as before.
    assert backend_settings(None, model, env) == {"LLM_MODEL": "m"}


@pytest.mark.parametrize(
    ("backend", "kwargs", "words"),
    [
        ("anthropic", {"model_name": "claude"}, "not OpenAI-compatible"),
        ("gemini", {"model_name": "g"}, "backend='openai' with backend_kwargs"),
        ("azure_openai", {}, "not OpenAI-compatible"),
        ("portkey", {}, "not OpenAI-compatible"),
        ("bedrock", {}, "unknown backend 'bedrock': use one of openai, vllm"),
        ("vllm", {"model_name": "m"}, "needs backend_kwargs={'base_url'"),
        ("openai", {"model_name": "m", "sampling_args": {"temperature": 0}}, "not understood"),
    ],
)
def test_other_backends_are_refused_clearly(backend, kwargs, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace("[", r"\[")) as e:
        RLM(backend=backend, backend_kwargs=kwargs)
    assert isinstance(e.value, RLMError) and isinstance(e.value, ValueError)


def test_an_unknown_environment_is_refused():
    with pytest.raises(ConfigError, match="environment must be one of 'wasm', 'remote', 'local'"):
        RLM({"base_url": "http://127.0.0.1:9/v1", "model_name": "m"}, environment="kubernetes")


# ----------------------------------------------------------------------------- stops


def test_a_stop_is_a_result_that_can_raise_the_official_error(llm):
    llm.switch.current = never_answers
    with RLM({"base_url": llm.base_url, "model_name": "m"}, max_iterations=2) as rlm:
        result = rlm.completion("hello")
    assert result.status == "stopped" and result.stop_code == "max_iterations"
    assert result.response is None
    with pytest.raises(IterationLimitError) as e:
        result.raise_for_status()
    assert e.value.partial_answer is None and e.value.result is result
    assert "no answer after 2 turns" in str(e.value)


def test_raise_on_stop_raises_out_of_completion_with_the_partial_answer(llm):
    llm.switch.current = scripted_replies([repl("answer['content'] = 'so far: 3'")])
    settings = {"max_tokens": 1500, "raise_on_stop": True}
    rlm = RLM({"base_url": llm.base_url, "model_name": "m"}, **settings)
    with rlm, pytest.raises(TokenLimitExceededError) as e:
        rlm.completion("hello")
    assert e.value.partial_answer == "so far: 3"
    assert isinstance(e.value, LimitExceeded) and e.value.code == "max_tokens"
    assert e.value.result.usage_summary.model_usage_summaries["m"].total_calls >= 1


def test_an_answer_at_the_iteration_limit_does_not_raise(llm):
    llm.switch.current = scripted_replies([repl("x = 'late'"), "FINAL_VAR(x)"])
    with RLM({"base_url": llm.base_url, "model_name": "m"}, max_iterations=1,
             raise_on_stop=True) as rlm:  # fmt: skip
        result = rlm.completion("hello")
    assert result.response == "late" and result.status == "completed"
    assert result.stop_code == "max_iterations"


def test_readme_examples_are_quoted_from_the_official_readme():
    """The examples above are the official text: only their import lines differ here."""
    for example in (QUICKSTART, LOGGER):
        changed = at_home(example)
        different = [
            (a, b)
            for a, b in zip(example.splitlines(), changed.splitlines(), strict=True)
            if a != b
        ]
        assert different and all(a.startswith("from rlm") for a, _ in different)
    assert textwrap.dedent(QUICKSTART) == QUICKSTART

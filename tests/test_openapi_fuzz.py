"""Schemathesis against each function's /openapi.json, both served as real processes.

Every generated request, valid or not, must get a documented status with a documented body and
content type, and never a 5xx. `positive_data_acceptance` is left out: some schema-valid bodies
are refused for reasons JSON Schema cannot state (a `state.data` that is not base64 of a zlib
blob, `rlm_context.data` whose sha256 is not its `ref`, a `context_uri` that answers 404), and
those refusals are the documented 4xx.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from functions.testing.scripted_model import repl, scripted_replies

MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
EXAMPLES = 25  # per mode and function: ~10 s each on two cores


def fuzz(url: str, mode: GenerationMode, adjust: Any = None) -> None:
    schema = schemathesis.openapi.from_url(url + "/openapi.json")

    @given(case=schema.as_strategy(mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)  # fmt: skip
    def check(case: Any) -> None:
        if adjust and isinstance(case.body, dict):
            adjust(case.body)
        case.call_and_validate(timeout=60, excluded_checks=[positive_data_acceptance])

    check()


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_execute_conforms_to_its_document(execute_server, mode):
    fuzz(execute_server.url, mode)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_infer_conforms_to_its_document(stack, llm, mode):
    # A short run: one cell, then a final answer, whatever the query and context.
    llm.switch.current = scripted_replies([repl("print(type(context).__name__)"), "FINAL(done)"])
    nowhere = stack.infer.url + "/nowhere"  # a context_uri that answers 404, not the internet

    def bounded(body: dict[str, Any]) -> None:
        """Keep valid runs short; values that are already invalid are left as generated."""
        for name, most in (("max_iterations", 2), ("max_depth", 1)):
            if type(body.get(name)) is int and body[name] > most:
                body[name] = most
        if str(body.get("context_uri", "")).startswith(("http://", "https://")):
            body["context_uri"] = nowhere

    fuzz(stack.infer.url, mode, bounded)

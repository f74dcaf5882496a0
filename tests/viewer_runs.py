"""Real runs for the viewer's and the display's tests: the SDK in this process, the sandbox, and
the scripted model playing a root that takes 3 turns (an error, a child RLM), one that never
answers in 50, and one that makes 200 sub-calls in a batch."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from functions.infer.service import CHILD_QUERY
from functions.sdk import RLM
from functions.testing.haystack import haystack
from functions.testing.scripted_model import ModelRequest, ScriptedModel, repl

PRICES = '{"scripted-root": [1.25, 10.0], "scripted-sub": [0.25, 2.0]}'
CITIES = ["Lisbon", "Porto", "Braga", "Faro", "Coimbra", "Aveiro"]


def city_log(lines: int = 6000) -> str:
    """A shipping log in which Porto is named most often (2 in 5 lines)."""
    out = []
    for i in range(lines):
        city = "Porto" if i % 5 in (1, 3) else CITIES[(i * 7) % len(CITIES)]
        out.append(f"2024-03-{1 + i % 28:02d} {i % 24:02d}:{i % 60:02d} order {10_000 + i} "
                   f"shipped to {city}")  # fmt: skip
    return "\n".join(out)


PROBE = repl(
    "print(len(context))\nprint(context[:160])",
    "Let me look at the start of the log before counting anything.",
)
BROKEN = repl(
    "counts = Counter(line.rsplit(' ', 1)[-1] for line in context.splitlines())\n"
    "print(counts.most_common(3))",
    "Each line ends with a city. I will count them.",
)
FIXED = repl(
    """
from collections import Counter
counts = Counter(line.rsplit(' ', 1)[-1] for line in context.splitlines())
print(counts.most_common(3))
lines = context.splitlines()
parts = ["\\n".join(lines[i : i + 1000]) for i in range(0, len(lines), 1000)]
votes = llm_query_batched(
    [f"Which city is named most often in these lines? One word.\\n{p}" for p in parts]
)
print("sub-model votes:", votes)
check = rlm_query(f"Check: is Porto named more often than Lisbon here?\\n{context[:20000]}")
print("child RLM says:", check)
city, times = counts.most_common(1)[0]
answer["content"] = f"{city}, named {times:,} times"
answer["ready"] = True
""",
    "Counter needs its import. I will count again, ask the sub-model to vote on each thousand "
    "lines, and have a child RLM double-check the first part.",
)


def three_turn_policy(request: ModelRequest) -> str:
    if not request.is_root:
        return "Porto" if "city" in request.last else "yes"
    if CHILD_QUERY in request.messages[1]["content"]:  # the child RLM that checks
        if request.turn == 0:
            return repl(
                "porto, lisbon = context.count('Porto'), context.count('Lisbon')\n"
                "print(porto, lisbon)\nanswer['content'] = 'yes' if porto > lisbon else 'no'\n"
                "answer['ready'] = True",
                "Counting both names in the text I was given.",
            )
        return "FINAL(yes)"
    return [PROBE, BROKEN, FIXED][min(request.turn, 2)]


def fifty_turn_policy(request: ModelRequest) -> str:
    """Reads the log a slice a turn and never finds what it is asked (the final request
    gets the answer the model can give)."""
    if not request.is_root:
        return "NONE"
    if "no turns left" in request.last:
        return "I read every slice and found no vault code.\nFINAL(no vault code in the log)"
    n = request.turn
    if n % 9 == 4:
        return repl(f"print(slice_{n}.count('vault'))", f"Slice {n}: checking the last result.")
    return repl(
        f"slice_{n} = context[{n * 2000}:{(n + 1) * 2000}]\n"
        f"print({n}, slice_{n}.count('vault'), slice_{n}[:60])",
        f"Slice {n} of the log: looking for the word 'vault'.",
    )


SEARCH_200 = repl(
    """
size = len(context) // 200 + 1
chunks = [context[i : i + size] for i in range(0, len(context), size)]
replies = llm_query_batched(
    [f"Find the magic number in this text. Reply with just the number or NONE.\\n{c}"
     for c in chunks]
)
found = [r for r in replies if r.strip() != "NONE"]
print(f"{len(chunks)} chunks, {len(found)} with a number: {found}")
answer["content"] = found[0] if found else None
answer["ready"] = bool(found)
""",
    "The context is large: I will split it into 200 chunks and ask the sub-model about each.",
)


def many_subcall_policy(request: ModelRequest) -> str:
    if not request.is_root:
        found = re.search(r"magic number is (\d+)", request.last)
        return found.group(1) if found else "NONE"
    if request.turn == 0:
        return repl("print(len(context))", "How big is the context?")
    return SEARCH_200


@dataclass(frozen=True)
class Scenario:
    question: str
    policy: Callable[[ModelRequest], str]
    context: Callable[[], Any]
    options: dict[str, Any]


SCENARIOS = {
    "three": Scenario(
        "Which city is named most often in the shipping log, and how many times?",
        three_turn_policy, city_log, {"max_depth": 1},
    ),
    "fifty": Scenario(
        "What is the vault code mentioned in the log?",
        fifty_turn_policy, lambda: city_log(20_000), {"max_iterations": 50},
    ),
    "subcalls": Scenario(
        "What is the magic number hidden in the text?",
        many_subcall_policy, lambda: haystack(1_000_000, 8_675_309), {},
    ),
}  # fmt: skip


def run(name: str, monkeypatch: Any) -> tuple[list[dict[str, Any]], Any]:
    """The scenario's trajectory (with its `run` entry) and the SDK's result."""
    scenario = SCENARIOS[name]
    monkeypatch.setenv("LLM_PRICES", PRICES)
    monkeypatch.setenv("LLM_SUB_MODEL", "scripted-sub")
    with ScriptedModel(scenario.policy) as model:
        backend = {"base_url": model.base_url, "api_key": "k", "model_name": "scripted-root"}
        with RLM(backend, sub_model="scripted-sub", **scenario.options) as rlm:
            result = rlm.completion(scenario.context(), root_prompt=scenario.question)
        first = model.root_requests()[0]
    trajectory = list(result.metadata["trajectory"])
    start = trajectory[0]
    assert start["kind"] == "run" and start["query"] == scenario.question
    assert start["system_prompt"] == first.messages[0]["content"]
    return trajectory, result

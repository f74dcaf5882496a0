"""The `rlm` command, run as a user runs it: a real process, its output and exit code."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from functions.testing.haystack import haystack
from functions.testing.processes import process_tree
from functions.testing.scripted_model import repl
from tests.conftest import ROOT, free_port

NO_LLM = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}


def rlm(*args: str, env: dict | None = None, stdin: str | None = None, timeout: float = 180):
    return subprocess.run(
        [sys.executable, "-m", "functions.cli", *args],
        cwd=ROOT,
        env=env if env is not None else NO_LLM,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def llm_env(model) -> dict[str, str]:
    return {**NO_LLM, "LLM_BASE_URL": model.base_url, "LLM_API_KEY": "k",
            "LLM_MODEL": "scripted-root"}  # fmt: skip


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def test_bad_usage_is_one_line_exit_2(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (["ask", "q", "--context", "x"], "no LLM configured"),
        (["ask", "q", "--max-depth", "two"], "not a whole number"),
        (["ask", "q", "--max-budget", "-1"], "must be more than 0"),
        (["ask", "q", "--max-budget", "nan"], "not a finite number"),
        (["ask", "q", "--max-timeout", "0"], "must be more than 0"),
        (["ask", "q", "--max-iterations", "0"], "0 must be at least 1"),
        (["ask", "q", "--max-tokens", "0"], "0 must be at least 1"),
        (["ask", "q", "--max-errors", "0"], "0 must be at least 1"),
        (["ask", "q", "--max-iterations", "-3"], "must not be negative"),
        (["demo", "--size", "0"], "0 must be at least 1"),
        (["serve", "--port", "0"], "is not a port"),
        (["serve", "--max-runs", "0"], "0 must be at least 1"),
        (["exec", "print(1)", "--timeout", "0"], "must be more than 0"),
        (["view", str(tmp_path / "missing.jsonl")], "not found"),
        (["view", str(empty)], "holds no entries"),
        (["bogus"], "invalid choice"),
    ]
    for args, words in cases:
        done = rlm(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert words in one_line(done.stderr), args
    assert "LLM_BASE_URL, LLM_API_KEY and LLM_MODEL" in rlm("ask", "q").stderr


def test_values_the_request_refuses_name_their_flag(llm):
    env = llm_env(llm)
    for args, words in [
        (["--max-depth", "9"], "--max-depth 9: input should be less than or equal to 8"),
        (["--max-iterations", "5000"], "--max-iterations 5000: input should be less than"),
    ]:
        done = rlm("ask", "q", *args, env=env)
        assert done.returncode == 2 and words in one_line(done.stderr), done.stderr
    done = rlm("ask", "", env=env)
    assert done.returncode == 2 and "the question: " in one_line(done.stderr)
    done = rlm("ask", "q", "--trajectory", "/nonexistent/run.jsonl", env=env)
    assert done.returncode == 2
    assert (
        one_line(done.stderr)
        == "rlm: --trajectory /nonexistent/run.jsonl: No such file or directory"
    )
    assert llm.requests == []  # refused before any model call


def test_version():
    done = rlm("--version")
    assert done.returncode == 0 and re.fullmatch(r"rlm \d+\.\d+\.\d+\S*\n", done.stdout)


def test_ask_bad_context(llm, tmp_path):
    env = llm_env(llm)
    done = rlm("ask", "q", "--context", str(tmp_path / "nope.txt"), env=env)
    assert done.returncode == 2 and "--context" in one_line(done.stderr)
    assert "no such file" in done.stderr
    done = rlm("ask", "q", "--context", "http://127.0.0.1:9/x", env=env)
    line = one_line(done.stderr)
    assert done.returncode == 2 and "cannot fetch --context http://127.0.0.1:9/x" in line
    assert "context_uri" not in line
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    done = rlm("view", str(bad))
    assert done.returncode == 2 and "not a trajectory" in one_line(done.stderr)


def no_control_codes(text: str) -> None:
    assert "\x1b" not in text and "\r" not in text, text[:500]


def test_ask_embedded_against_the_scripted_server(llm, tmp_path):
    context = tmp_path / "haystack.txt"
    context.write_text(haystack(300_000, 2718))
    trajectory = tmp_path / "run.jsonl"
    done = rlm("ask", "What is the magic number?", "--context", str(context),
               "--trajectory", str(trajectory), env=llm_env(llm))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2718"
    kinds = [json.loads(line)["kind"] for line in trajectory.read_text().splitlines()]
    assert kinds[:2] == ["run", "llm"] and kinds[-1] == "final"
    # Off a terminal: plain lines, a cell a line, then how the run ended.
    no_control_codes(done.stderr)
    assert "turn 1: running: print(type(context))" in done.stderr
    assert "turn 2: cell done in" in done.stderr and "· 3 sub-calls" in done.stderr
    assert "✔ completed · 2 turns · 3 sub-calls" in done.stderr
    assert f"rlm view {trajectory}" in done.stderr
    assert "Traceback" not in done.stderr
    done = rlm("ask", "magic?", "--context", "-", "--json", "-q", env=llm_env(llm),
               stdin=haystack(50_000, 99))  # fmt: skip
    result = json.loads(done.stdout)
    assert result["answer"] == "99" and result["status"] == "completed"
    assert all(line.startswith("warning: ") for line in done.stderr.splitlines()), done.stderr


def test_a_run_stopped_by_a_limit_says_which_and_exits_3(llm):
    env = {**llm_env(llm), "LLM_PRICES": '{"scripted-root": [1000.0, 1000.0]}'}
    args = ("ask", "magic?", "--context", "-", "--max-budget", "0.01")
    done = rlm(*args, env=env, stdin=haystack(20_000, 7))
    assert done.returncode == 3, done.stderr
    no_control_codes(done.stderr)
    assert "■ stopped (max_budget_usd) · 1 turn" in done.stderr
    assert "\n  max_budget_usd: " in done.stderr  # the reason, under the outcome
    done = rlm(*args, "-q", env=env, stdin=haystack(20_000, 7))
    assert done.returncode == 3
    assert one_line(done.stderr).startswith("rlm: run stopped: max_budget_usd: spent $")


def test_an_answer_given_only_at_the_turn_limit_is_not_shown_as_a_plain_success(llm):
    def policy(request):
        if not request.is_root:
            return "x"
        return "FINAL(at the limit)" if "no turns left" in request.last else repl("print(1)")

    llm.switch.current = policy
    done = rlm("ask", "q", "--context", "-", "--max-iterations", "2", env=llm_env(llm),
               stdin="abc")  # fmt: skip
    assert done.stdout == "at the limit\n"
    assert "⚑ completed (max_iterations) · 2 turns" in done.stderr
    assert "max_iterations: answered in the final request after 2 turns" in done.stderr
    assert "✔" not in done.stderr


def test_warnings_are_lines_of_their_own(llm, tmp_path):
    env = {**llm_env(llm), "LLM_MODEL": "model-without-a-price"}
    done = rlm("ask", "magic?", "--context", "-", env=env, stdin=haystack(20_000, 7))
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert (
        "warning: no price for model 'model-without-a-price': its calls count as $0 "
        "(set LLM_PRICES)" in lines
    )
    assert not any(line.startswith("{") for line in lines)  # not a JSON log line


def test_ask_verbose_against_a_deployed_endpoint(stack, llm, tmp_path):
    context = tmp_path / "c.txt"
    context.write_text(haystack(100_000, 1234))
    done = rlm("ask", "magic?", "--context", str(context), "--endpoint", stack.infer.url,
               "--verbose")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1234"
    err = done.stderr
    no_control_codes(err)
    assert "question: magic?" in err and f"where: {stack.infer.url}" in err
    assert "── turn 1 · reply" in err and "First, a look at the context." in err
    assert "── turn 2 · cell 1" in err and "    chunks = [text[i : i + size]" in err
    # sub-calls as they complete, with their prompts and answers, then the cell's output
    assert "↳ llm_query 1/1 · scripted-sub" in err
    assert "prompt  Find the magic number in this text." in err and "answer  1234" in err
    assert "── output · 1 sub-call" in err and "1 chunks searched; found: ['1234']" in err
    assert err.index("↳ llm_query 1/1") < err.index("── output · 1 sub-call")
    # the summary table, then the outcome
    assert re.search(r"scripted-root\s+2\s+[\d,]+\s+[\d,]+\s+\$\d", err)
    assert re.search(r"scripted-sub\s+1\s+[\d,]+\s+[\d,]+\s+\$\d", err)
    assert re.search(r"total\s+3\s+", err)
    assert "✔ completed · 2 turns · 1 sub-call ·" in err


def test_exec_and_warm():
    done = rlm("exec", "print(6 * 7)")
    assert done.returncode == 0 and done.stdout == "42\n" and done.stderr == ""
    done = rlm("exec", "-", stdin="import os\nos.listdir('/')")
    assert done.returncode == 1 and "FileNotFoundError" in done.stderr
    done = rlm("warm")
    assert done.returncode == 0 and done.stdout.startswith("sandbox ready in")


def test_exec_says_why_a_cell_was_stopped_and_keeps_its_output():
    done = rlm("exec", "--timeout", "2", "print('before the loop')\nwhile True: pass")
    assert done.returncode == 1
    assert done.stdout == "before the loop\n"
    assert one_line(done.stderr) == "rlm: the cell ran past its deadline of 2 s"
    done = rlm("exec", "-", stdin="   \n")
    assert done.returncode == 2 and "no code to run" in one_line(done.stderr)


def test_demo_and_viewer(tmp_path):
    trajectory = tmp_path / "demo.jsonl"
    done = rlm("demo", "--size", "400000", "--trajectory", str(trajectory))
    assert done.returncode == 0, done.stderr
    assert "stand-in, NOT a language model" in done.stdout
    assert "no price" not in done.stderr and "warning" not in done.stderr
    no_control_codes(done.stderr)
    answer = next(ln for ln in done.stdout.splitlines() if ln.startswith("answer:")).split()[1]
    page = tmp_path / "page.html"
    shown = rlm("view", str(trajectory), "-o", str(page))
    assert shown.returncode == 0 and shown.stdout.strip() == str(page)
    top = page.read_text().split("</header>")[0]
    assert f"<pre class='answer'>{answer}</pre>" in top and "Completed" in top


# ----------------------------------------------------------------------------- rlm serve


class Serving:
    """`rlm serve` as a user starts it, its output read as it comes."""

    def __init__(self, llm, *flags: str) -> None:
        self.port, self.execute_port = free_port(), free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "functions.cli", "serve", "--port", str(self.port),
             "--execute-port", str(self.execute_port), *flags],
            cwd=ROOT, env=llm_env(llm), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while "stops both" not in self.output:
            assert self.process.poll() is None, self.output
            assert time.monotonic() < deadline, self.output
            time.sleep(0.05)

    def tree(self) -> list[int]:
        return process_tree(self.process.pid)

    def stop(self, signum: int) -> tuple[int, float]:
        started = time.monotonic()
        self.process.send_signal(signum)
        code = self.process.wait(30)
        self.reader.join(5)
        return code, time.monotonic() - started


def gone(pids: list[int]) -> bool:
    """No process left of `pids` (a zombie waiting for its reaper counts as gone)."""
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            return False
    return True


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def assert_all_stopped(serving: Serving, pids: list[int]) -> None:
    deadline = time.monotonic() + 5  # orphans are reaped by init, not by us
    while not gone(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(pids), [p for p in pids if not gone([p])]
    assert not listening(serving.port) and not listening(serving.execute_port)
    for words in ("Traceback", "panicked", "Exception ignored", "Connection in use"):
        assert words not in serving.output, serving.output


def test_serve_names_its_urls_when_ready_and_takes_more_than_three_runs(llm):
    serving = Serving(llm)
    try:
        serving.wait_ready()
        assert f"infer    {serving.url}/infer" in serving.output
        assert f"execute  http://127.0.0.1:{serving.execute_port}/execute" in serving.output
        assert "8 runs at once" in serving.output
        # Both answer when the URLs are printed: no 503 while the sandbox loads.
        assert httpx.get(f"http://127.0.0.1:{serving.execute_port}/health/readiness").is_success
        pids = serving.tree()
        assert len(pids) >= 5  # rlm serve, two servers and their workers
        group = os.getpgid(pids[1])
        assert group != os.getpgid(serving.process.pid)
        assert all(os.getpgid(pid) == group for pid in pids[1:])
        llm.latency_s = 1.0

        def ask(n: int) -> httpx.Response:
            body = {"query": "magic?", "context": haystack(20_000, 50 + n)}
            return httpx.post(serving.url + "/infer", json=body, timeout=60)

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
        assert [r.status_code for r in answers] == [200] * 6
        assert [r.json()["answer"] for r in answers] == [str(50 + n) for n in range(6)]
    finally:
        code, _ = serving.stop(signal.SIGINT)
    assert code == 0
    assert_all_stopped(serving, pids)


def post_and_ignore(url: str, body: dict) -> None:
    """A request whose server is stopped under it: it fails, as it should."""
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(url, json=body, timeout=30)


@pytest.mark.parametrize("signals", [[signal.SIGTERM, signal.SIGINT, signal.SIGTERM]])
def test_serve_stops_everything_on_every_signal(llm, signals):
    """SIGTERM and SIGINT, again and again: idle, mid-run, and while still starting."""
    llm.latency_s = 3.0
    for round_, signum in enumerate(signals):
        serving = Serving(llm)
        if round_ == 2:  # still starting: the URLs are not printed yet
            time.sleep(0.5)
            pids = serving.tree()
        else:
            serving.wait_ready()
            pids = serving.tree()
        if round_ == 1:  # a run in progress, its model call taking 3 s
            body = {"query": "magic?", "context": haystack(20_000, 5)}
            threading.Thread(target=post_and_ignore, args=(serving.url + "/infer", body),
                             daemon=True).start()  # fmt: skip
            time.sleep(1.0)
        code, took = serving.stop(signum)
        assert code == 0, serving.output
        assert took < 10, took
        assert_all_stopped(serving, pids)


def test_serve_children_stop_when_it_is_killed(llm):
    serving = Serving(llm)
    serving.wait_ready()
    pids = serving.tree()
    serving.stop(signal.SIGKILL)
    assert_all_stopped(serving, pids[1:])


def test_serve_refuses_what_cannot_work_in_one_line(llm):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = rlm("serve", "--port", str(port), env=llm_env(llm))
        assert done.returncode == 2 and f"127.0.0.1:{port} is not free" in one_line(done.stderr)
        assert "--port" in done.stderr
    done = rlm("serve", "--threads", "4", "--max-runs", "8", "--port", str(free_port()),
               env=llm_env(llm))  # fmt: skip
    line = one_line(done.stderr)
    assert done.returncode == 2 and "--threads 4 serves at most 1 runs" in line
    assert "give --threads 18" in line
    done = rlm("serve", "--port", "8090", "--execute-port", "8090", env=llm_env(llm))
    assert done.returncode == 2 and "cannot share port 8090" in one_line(done.stderr)

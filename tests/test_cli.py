"""The `rlm` command, run as a user runs it: a real process, its output and exit code."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest

from functions.testing.haystack import haystack
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
    cases = [
        (["ask", "q", "--context", "x"], "no LLM configured"),
        (["ask", "q", "--max-depth", "two"], "not a whole number"),
        (["ask", "q", "--max-budget", "-1"], "must be more than 0"),
        (["view", str(tmp_path / "missing.jsonl")], "not found"),
        (["bogus"], "invalid choice"),
    ]
    for args, words in cases:
        done = rlm(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert words in one_line(done.stderr)
    assert "LLM_BASE_URL, LLM_API_KEY and LLM_MODEL" in rlm("ask", "q").stderr


def test_ask_bad_context(llm, tmp_path):
    env = llm_env(llm)
    done = rlm("ask", "q", "--context", str(tmp_path / "nope.txt"), env=env)
    assert done.returncode == 2 and "context file not found" in one_line(done.stderr)
    done = rlm("ask", "q", "--context", "http://127.0.0.1:9/x", env=env)
    assert done.returncode == 2 and "cannot fetch" in one_line(done.stderr)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    done = rlm("view", str(bad))
    assert done.returncode == 2 and "not a trajectory" in one_line(done.stderr)


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
    done = rlm("ask", "magic?", "--context", "-", "--json", "-q", env=llm_env(llm),
               stdin=haystack(50_000, 99))  # fmt: skip
    result = json.loads(done.stdout)
    assert result["answer"] == "99" and result["status"] == "completed"


def test_ask_against_a_deployed_endpoint(stack, llm, tmp_path):
    context = tmp_path / "c.txt"
    context.write_text(haystack(100_000, 1234))
    done = rlm("ask", "magic?", "--context", str(context), "--endpoint", stack.infer.url,
               "--verbose")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1234"
    assert "turn 2:" in done.stderr  # progress lines off a terminal with --verbose


def test_exec_and_warm():
    done = rlm("exec", "print(6 * 7)")
    assert done.returncode == 0 and done.stdout == "42\n"
    done = rlm("exec", "-", stdin="import os\nos.listdir('/')")
    assert done.returncode == 1 and "FileNotFoundError" in done.stderr
    assert rlm("warm").returncode == 0


def test_demo_and_viewer(tmp_path):
    trajectory = tmp_path / "demo.jsonl"
    done = rlm("demo", "--size", "400000", "--trajectory", str(trajectory))
    assert done.returncode == 0, done.stderr
    assert "stand-in, NOT a language model" in done.stdout
    answer = next(ln for ln in done.stdout.splitlines() if ln.startswith("answer:"))
    page = tmp_path / "page.html"
    assert rlm("view", str(trajectory), "-o", str(page)).returncode == 0
    dom = _render_in_chromium(page)
    number = answer.split()[1]
    assert dom.count("Model reply") == 2 and dom.count("<h2>Code</h2>") == 2
    assert f'<pre class="out answer">{number}</pre>' in dom
    assert "llm_query 1" in dom and "Final answer (completed)" in dom


def _render_in_chromium(page) -> str:
    """The page's DOM after headless Chromium loads it; any network request would reach a
    proxy listener here, and the test checks it got none."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian chromium is not installed (.ci/run installs it)")
    proxy = socket.socket()
    proxy.bind(("127.0.0.1", 0))
    proxy.listen()
    proxy.settimeout(0.2)
    hits: list = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                connection, _ = proxy.accept()
                connection.settimeout(2)
                hits.append(_target(connection.recv(1000)))
                connection.close()
            except OSError:
                pass

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        with tempfile.TemporaryDirectory() as profile:
            done = subprocess.run(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={profile}",
                 f"--proxy-server=127.0.0.1:{proxy.getsockname()[1]}",
                 "--proxy-bypass-list=<-loopback>", "--dump-dom", page.as_uri()],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
    finally:
        stop.set()
        thread.join()
        proxy.close()
    from_page = [host for host in hits if host not in BROWSER_OWN_HOSTS]
    assert from_page == [], f"the page made network requests: {from_page}"
    text = page.read_text()
    for reference in ("src=", "href=", "url(", "@import", "<script"):
        assert reference not in text
    return done.stdout


# Chromium's own services, which it calls even headless; a request from the page would name
# any other host (a font, a script, an image) and fail the test.
BROWSER_OWN_HOSTS = {
    "clients2.google.com", "update.googleapis.com", "accounts.google.com",
    "optimizationguide-pa.googleapis.com", "content-autofill.googleapis.com",
    "safebrowsing.googleapis.com", "clientservices.googleapis.com", "www.google.com",
}  # fmt: skip


def _target(request: bytes) -> str:
    """The host a proxied request is for: CONNECT host:port, or GET http://host/..."""
    first = request.split(b"\r\n", 1)[0].decode("latin-1").split()
    if len(first) < 2:
        return "?"
    target = first[1].removeprefix("http://").removeprefix("https://")
    return target.split("/", 1)[0].split(":", 1)[0]


def test_serve_starts_both_and_stops_on_ctrl_c(llm):
    infer_port, execute_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "functions.cli", "serve", "--infer-port", str(infer_port),
         "--execute-port", str(execute_port)],
        cwd=ROOT, env=llm_env(llm), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{infer_port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                body = {"query": "magic?", "context": haystack(20_000, 55)}
                r = httpx.post(url + "/infer", timeout=30, json=body)
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert r.json()["answer"] == "55"
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert f"infer:   {url}/infer" in output
    assert process.returncode == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/health", timeout=2)

"""The `rlm` command: ask questions of large inputs, serve the functions, debug the sandbox."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

LLM_SETTINGS_HINT = (
    "no LLM configured: set LLM_BASE_URL, LLM_API_KEY and LLM_MODEL (any OpenAI-compatible "
    "endpoint), or run `rlm demo` to see the pipeline work offline"
)


class UsageError(Exception):
    """A bad argument or setting: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- ask


def _read_context(source: str | None) -> Any:
    from functions.infer.inputs import ContextError, fetch, read_file

    limit = 1 << 30
    try:
        if source is None:
            return ""
        if source == "-":
            return sys.stdin.read()
        if source.startswith(("http://", "https://")):
            return fetch(source, limit)
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"context file not found: {source}")
        return read_file(path, limit)
    except ContextError as e:
        raise UsageError(str(e)) from None


def _request_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields = {
        "model": args.model,
        "sub_model": args.sub_model,
        "max_depth": args.max_depth,
        "max_iterations": args.max_iterations,
        "max_budget_usd": args.max_budget,
        "max_timeout_s": args.max_timeout,
        "max_tokens": args.max_tokens,
        "max_errors": args.max_errors,
    }
    return {k: v for k, v in fields.items() if v is not None}


def _ask(args: argparse.Namespace) -> int:
    from functions.progress import Progress

    if not args.endpoint:
        args.base_url = args.base_url or os.environ.get("LLM_BASE_URL")
        args.model = args.model or os.environ.get("LLM_MODEL")
        if not args.base_url or not args.model:
            raise UsageError(LLM_SETTINGS_HINT)
    context = _read_context(args.context)
    progress = Progress(verbose=args.verbose) if not args.quiet else None
    if args.endpoint:
        result = _ask_endpoint(args, context, progress)
    else:
        result = _ask_embedded(args, context, progress)
    if args.trajectory:
        with open(args.trajectory, "w", encoding="utf-8") as f:
            for entry in result.get("trajectory") or []:
                f.write(json.dumps(entry, default=str) + "\n")
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        if result.get("status") != "completed" or result.get("stop_code"):
            why = result.get("stop_reason") or result.get("error")
            print(f"rlm: run {result.get('status')}: {why}", file=sys.stderr)
        if result.get("answer") is not None:
            print(result["answer"])
    return {"completed": 0, "stopped": 3}.get(result.get("status", ""), 1)


def _ask_embedded(args: argparse.Namespace, context: Any, progress: Any) -> dict[str, Any]:
    from functions.contract import InferRequest
    from functions.sdk import RLM

    rlm = RLM({"base_url": args.base_url, "model_name": args.model,
               "api_key": os.environ.get("LLM_API_KEY", "none")}, on_event=progress,
              max_depth=args.max_depth)  # fmt: skip
    try:
        fields = _request_fields(args)
        fields.setdefault("max_depth", rlm.settings.max_depth)
        request = InferRequest(query=args.question, trajectory=True, **fields)
        result = rlm.service.run(request, context, progress)
    finally:
        rlm.close()
    return result.model_dump(mode="json")


def _ask_endpoint(args: argparse.Namespace, context: Any, progress: Any) -> dict[str, Any]:
    import httpx

    body = {"query": args.question, "context": context, "trajectory": True,
            **_request_fields(args)}  # fmt: skip
    url = args.endpoint.rstrip("/") + "/infer"
    try:
        with httpx.stream("POST", url, json=body, timeout=None,
                          headers={"accept": "text/event-stream"}) as response:  # fmt: skip
            if response.status_code != 200:
                response.read()
                raise UsageError(f"{url} answered {response.status_code}: {response.text[:300]}")
            kind = ""
            for line in response.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if kind == "result":
                        return data
                    if kind == "error":
                        raise UsageError(f"{url}: {data.get('error')}")
                    if progress:
                        progress(kind, data)
    except httpx.HTTPError as e:
        raise UsageError(f"cannot reach {url}: {e}") from None
    raise UsageError(f"{url} closed the stream before the result")


# ----------------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    from functions.progress import Progress
    from functions.sdk import RLM
    from functions.testing.haystack import haystack
    from functions.testing.scripted_model import STAND_IN_NAME, ScriptedModel, needle_policy

    needle = 4_000_000 + secrets.randbelow(999_999)
    context = haystack(args.size, needle)
    print(
        f"model: {STAND_IN_NAME}: a scripted stand-in, NOT a language model; it plays the "
        "root and sub-models so the loop, sandbox and sub-calls can be seen without a key"
    )
    print(f"context: {len(context):,} characters of generated text with one magic number hidden")
    with ScriptedModel(needle_policy) as model:
        rlm = RLM({"base_url": model.base_url, "api_key": "none", "model_name": STAND_IN_NAME},
                  on_event=Progress(verbose=True))  # fmt: skip
        try:
            result = rlm.completion(context, root_prompt="What is the magic number?")
        finally:
            rlm.close()
    print(f"answer: {result.response} (expected {needle})")
    print(f"iterations: {result.metadata['iterations']}, time: {result.execution_time:.2f}s, "
          f"sub-calls: {sum(u.calls for u in result.usage.values()) - 2}")  # fmt: skip
    if args.trajectory:
        with open(args.trajectory, "w", encoding="utf-8") as f:
            for entry in result.metadata["trajectory"]:
                f.write(json.dumps(entry, default=str) + "\n")
        print(f"trajectory: {args.trajectory} (see it with `rlm view {args.trajectory}`)")
    return 0 if result.response == str(needle) else 1


# ----------------------------------------------------------------------------- serve


def _serve(args: argparse.Namespace) -> int:
    for name in ("LLM_BASE_URL", "LLM_MODEL"):
        if not os.environ.get(name):
            raise UsageError(LLM_SETTINGS_HINT)
    host = args.host
    execute_url = f"http://{host}:{args.execute_port}"
    infer_url = f"http://{host}:{args.infer_port}"
    env = {
        **os.environ,
        "WASM_SERVICE_URL": execute_url,
        "INFER_CALLBACK_URL": infer_url,
        "RLM_TOKEN_KEY": os.environ.get("RLM_TOKEN_KEY") or secrets.token_urlsafe(32),
        "LLM_API_KEY": os.environ.get("LLM_API_KEY") or "none",
    }
    from functions.local import command

    processes = [
        subprocess.Popen(command(plane, host, port), env=env)
        for plane, port in (("execute", args.execute_port), ("infer", args.infer_port))
    ]
    print(f"execute: {execute_url}/execute\ninfer:   {infer_url}/infer  "
          f"(also {infer_url}/v1/chat/completions)\nCtrl-C stops both.", flush=True)  # fmt: skip
    try:
        while all(p.poll() is None for p in processes):
            time.sleep(0.2)
        print("rlm: a function exited; stopping the other", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in processes:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


# ----------------------------------------------------------------------------- exec, warm, view


def _exec(args: argparse.Namespace) -> int:
    from functions.contract import ExecuteRequest
    from functions.execute.cells import CellRunner
    from functions.execute.settings import ExecuteSettings

    code = sys.stdin.read() if args.code == "-" else args.code
    runner = CellRunner(ExecuteSettings.from_env())
    try:
        result = runner.run(ExecuteRequest(code=code, timeout=args.timeout))
    finally:
        runner.close()
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
    return 1 if result.error else 0


def _warm(args: argparse.Namespace) -> int:
    from functions.execute.warm import main

    return main([args.cache_dir] if args.cache_dir else [])


def _view(args: argparse.Namespace) -> int:
    from functions.viewer import load_trajectory, render

    source = Path(args.trajectory)
    if not source.is_file():
        raise UsageError(f"trajectory file not found: {source}")
    try:
        entries = load_trajectory(source)
    except ValueError as e:
        raise UsageError(f"{source} is not a trajectory: {e}") from None
    target = Path(args.output or source.with_suffix(".html"))
    target.write_text(render(entries, title=source.name), encoding="utf-8")
    print(target)
    return 0


# ----------------------------------------------------------------------------- parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        self.exit(2, f"rlm: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rlm", description="Recursive Language Models on a WebAssembly sandbox.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("ask", help="answer a question about a large context")
    p.add_argument("question")
    p.add_argument("--context", "-c", help="a file, an http(s) URL, or - for standard input")
    p.add_argument("--endpoint", help="a deployed infer function's URL (default: embedded)")
    p.add_argument("--base-url", help="OpenAI-compatible endpoint (default: $LLM_BASE_URL)")
    p.add_argument("--model", help="root model (default: $LLM_MODEL)")
    p.add_argument("--sub-model", help="model for llm_query (default: $LLM_SUB_MODEL or root)")
    p.add_argument("--max-depth", type=_count)
    p.add_argument("--max-iterations", type=_count)
    p.add_argument("--max-budget", type=_positive_float, help="USD")
    p.add_argument("--max-timeout", type=_positive_float, help="seconds")
    p.add_argument("--max-tokens", type=_count)
    p.add_argument("--max-errors", type=_count)
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p.add_argument("--trajectory", help="write the run's trajectory (JSONL) here")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress")
    p.add_argument("--verbose", "-v", action="store_true", help="progress lines off a terminal")
    p.set_defaults(run=_ask)

    p = sub.add_parser("demo", help="an offline run with a scripted stand-in model")
    p.add_argument("--size", type=_count, default=2_000_000, help="context characters")
    p.add_argument("--trajectory", help="write the run's trajectory (JSONL) here")
    p.set_defaults(run=_demo)

    p = sub.add_parser("serve", help="run both functions locally, wired to each other")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--infer-port", type=_count, default=8080)
    p.add_argument("--execute-port", type=_count, default=8081)
    p.set_defaults(run=_serve)

    p = sub.add_parser("exec", help="run Python in the sandbox and print what it printed")
    p.add_argument("code", help="the code, or - to read it from standard input")
    p.add_argument("--timeout", type=_positive_float, default=30.0, help="seconds (default 30)")
    p.add_argument("--json", action="store_true", help="print the full execute response")
    p.set_defaults(run=_exec)

    p = sub.add_parser("warm", help="pre-compile the sandbox (once per machine or image)")
    p.add_argument("cache_dir", nargs="?", help="cache folder (default: $WASI_PYTHON_CACHE)")
    p.set_defaults(run=_warm)

    p = sub.add_parser("view", help="render a trajectory as a self-contained HTML page")
    p.add_argument("trajectory", help="a JSONL trajectory from --trajectory")
    p.add_argument("-o", "--output", help="the page to write (default: beside the JSONL)")
    p.set_defaults(run=_view)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except UsageError as e:
        print(f"rlm: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an environment problem: one line, not a traceback
        from functions.config import ConfigError

        if isinstance(e, ConfigError | ValueError):
            print(f"rlm: {e}", file=sys.stderr)
            return 2
        print(f"rlm: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

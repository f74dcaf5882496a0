"""The `rlm` command: ask questions of large inputs, serve the functions, debug the sandbox."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

LLM_SETTINGS_HINT = (
    "no LLM configured: set LLM_BASE_URL, LLM_API_KEY and LLM_MODEL (any OpenAI-compatible "
    "endpoint), or run `rlm demo` to see the pipeline work offline"
)
EXIT_CODES = {"completed": 0, "stopped": 3}  # anything else (failed): 1

# The request's fields as the command line names them, for messages about bad values.
FLAGS = {
    "query": "the question",
    "model": "--model",
    "sub_model": "--sub-model",
    "max_depth": "--max-depth",
    "max_iterations": "--max-iterations",
    "max_budget_usd": "--max-budget",
    "max_timeout_s": "--max-timeout",
    "max_tokens": "--max-tokens",
    "max_errors": "--max-errors",
    "context": "--context",
    "context_uri": "--context",
}


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
            raise UsageError(f"--context {source}: no such file")
        return read_file(path, limit)
    except ContextError as e:  # its messages name the HTTP field; here it is the flag
        raise UsageError(str(e).replace("context_uri", "--context")) from None


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


def checked_request(question: str, fields: dict[str, Any]) -> Any:
    """The request the run will make, validated now: a bad value is one line naming its flag."""
    from pydantic import ValidationError

    from functions.contract import InferRequest

    try:
        return InferRequest(query=question, trajectory=True, **fields)
    except ValidationError as e:
        problem = e.errors()[0]
        field = str(problem["loc"][0]) if problem["loc"] else ""
        given = fields.get(field, question if field == "query" else None)
        shown = f" {given}" if given is not None and field != "query" else ""
        message = problem["msg"][0].lower() + problem["msg"][1:]
        raise UsageError(f"{FLAGS.get(field, field)}{shown}: {message}") from None


def _ask(args: argparse.Namespace) -> int:
    from functions.progress import Progress

    if not args.endpoint:
        args.settings = _llm_settings(args)
        args.base_url, args.model = args.settings.base_url, args.settings.model
    fields = _request_fields(args)
    checked_request(args.question, fields)
    if args.trajectory:
        _writable(Path(args.trajectory), "--trajectory")
    context = _read_context(args.context)
    progress = None
    if not args.quiet:
        progress = Progress(verbose=args.verbose, header=_header(args, context))
    if args.endpoint:
        result = _ask_endpoint(args, fields, context, progress)
    else:
        result = _ask_embedded(args, fields, context, progress)
    if args.trajectory:
        _write_trajectory(Path(args.trajectory), result.get("trajectory") or [])
        if progress is not None:
            progress.console.print(f"trajectory: {args.trajectory} (a page of it: "
                                   f"`rlm view {args.trajectory}`)")  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        ended = result.get("status") != "completed" or result.get("stop_code")
        if progress is None and ended:  # else the display said
            why = result.get("stop_reason") or result.get("error")
            print(f"rlm: run {result.get('status')}: {why}", file=sys.stderr)
        if result.get("answer") is not None:
            print(result["answer"])
    return EXIT_CODES.get(result.get("status", ""), 1)


def _llm_settings(args: argparse.Namespace) -> Any:
    """The embedded run's settings: the environment's, with the flags over them."""
    from functions.config import ConfigError
    from functions.infer.settings import InferSettings

    given = {"LLM_BASE_URL": args.base_url, "LLM_MODEL": args.model}
    env = {**os.environ, **{k: v for k, v in given.items() if v}}
    env["LLM_API_KEY"] = env.get("LLM_API_KEY") or "none"  # a local server needs none
    try:
        return InferSettings.from_env(env, served=False)
    except ConfigError as e:
        if "LLM_BASE_URL" in str(e) or "LLM_MODEL" in str(e):
            raise UsageError(LLM_SETTINGS_HINT) from None
        raise UsageError(str(e)) from None


def _header(args: argparse.Namespace, context: Any) -> dict[str, str]:
    """What `--verbose` shows before the run starts."""
    where = args.endpoint or f"embedded, {args.base_url}"
    size = len(context) if isinstance(context, str | list | dict) else len(str(context))
    header = {
        "question": args.question if len(args.question) < 200 else args.question[:199] + "…",
        "model": args.model or "(the endpoint's default)",
        "sub-model": args.sub_model
        or (args.settings.sub_model if not args.endpoint else None)
        or "(the root model)",
        "where": where,
        "context": f"{args.context or '(none)'} · {type(context).__name__} of {size:,}",
    }
    limits = [f"{flag.removeprefix('--')} {value}" for field, value in _request_fields(args).items()
              if (flag := FLAGS[field]).startswith("--max")]  # fmt: skip
    if limits:
        header["limits"] = ", ".join(limits)
    return header


def _ask_embedded(
    args: argparse.Namespace, fields: dict[str, Any], context: Any, progress: Any
) -> dict[str, Any]:
    from functions.sdk import RLM

    backend = {"base_url": args.base_url, "model_name": args.model,
               "api_key": args.settings.api_key}  # fmt: skip
    rlm = RLM(backend, max_depth=args.max_depth)
    try:
        _load_sandbox(progress)
        fields.setdefault("max_depth", rlm.settings.max_depth)
        request = checked_request(args.question, fields)
        with progress or _quiet():
            result = rlm.service.run(request, context, progress)
    finally:
        rlm.close()
    return result.model_dump(mode="json")


def _ask_endpoint(
    args: argparse.Namespace, fields: dict[str, Any], context: Any, progress: Any
) -> dict[str, Any]:
    import httpx

    body = {"query": args.question, "context": context, "trajectory": True, **fields}
    url = args.endpoint.rstrip("/") + "/infer"
    try:
        with (
            progress or _quiet(),
            httpx.stream("POST", url, json=body, timeout=None,
                         headers={"accept": "text/event-stream"}) as response,
        ):  # fmt: skip
            if response.status_code != 200:
                response.read()
                raise UsageError(f"{url} answered {response.status_code}: {_problem(response)}")
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


def _problem(response: Any) -> str:
    """An error response's message: its JSON `error`, else the start of its text."""
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return " ".join(response.text.split())[:300]


def _quiet() -> Any:
    """What shows while a run goes with --quiet: its warnings, a line each."""
    from functions.progress import warnings_to

    return warnings_to(lambda message: print(f"warning: {message}", file=sys.stderr))


def _writable(path: Path, flag: str) -> None:
    """Refuse a file the run's end could not write, before the run spends anything."""
    try:
        path.open("a").close()
    except OSError as e:
        raise UsageError(f"{flag} {path}: {e.strerror}") from None


def _write_trajectory(path: Path, entries: list[dict[str, Any]]) -> None:
    try:
        with path.open("w", encoding="utf-8") as f:
            for entry in entries:
                f.write(json.dumps(entry, default=str) + "\n")
    except OSError as e:
        raise UsageError(f"--trajectory {path}: {e.strerror}") from None


# ----------------------------------------------------------------------------- sandbox


def _load_sandbox(progress: Any = None, cache_dir: str | None = None) -> dict[str, Any]:
    """Load the compiled sandbox into this process, compiling it first on a new machine (a
    minute or two, shown with an estimate); its stats."""
    from functions.execute.sandbox import warm
    from functions.progress import loading_sandbox

    return loading_sandbox(lambda: warm(cache_dir), progress.console if progress else None)


def _warm(args: argparse.Namespace) -> int:
    import time

    from functions.execute.settings import ExecuteSettings

    cache_dir = args.cache_dir or ExecuteSettings.from_env().wasm_cache_dir
    if cache_dir:
        try:
            os.makedirs(cache_dir, mode=0o700, exist_ok=True)
            os.chmod(cache_dir, 0o700)
        except OSError as e:
            raise UsageError(f"cache folder {cache_dir}: {e.strerror}") from None
    started = time.monotonic()
    stats = _load_sandbox(cache_dir=cache_dir or None)
    how = "compiled" if stats.get("compiled") else "loaded from the cache"
    print(f"sandbox ready in {time.monotonic() - started:.1f} s "
          f"({how}; cache: {cache_dir or 'the default cache folder'})")  # fmt: skip
    return 0


# ----------------------------------------------------------------------------- mcp


def _mcp(args: argparse.Namespace) -> int:
    from functions.infer.mcp_server import serve_stdio

    return serve_stdio()


def _exec(args: argparse.Namespace) -> int:
    from functions.contract import ExecuteRequest
    from functions.execute.cells import CellRunner
    from functions.execute.settings import ExecuteSettings

    code = sys.stdin.read() if args.code == "-" else args.code
    if not code.strip():
        raise UsageError("no code to run: give it as the argument, or - and standard input")
    _load_sandbox()
    runner = CellRunner(ExecuteSettings.from_env())
    try:
        result = runner.run(ExecuteRequest(code=code, timeout=args.timeout))
    finally:
        runner.close()
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        sys.stdout.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.write(result.stderr)
        if result.trapped and result.error:
            print(f"rlm: {result.error.message}", file=sys.stderr)
    return 1 if result.error else 0


# ----------------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    from functions.progress import Progress
    from functions.sdk import RLM
    from functions.testing.haystack import haystack
    from functions.testing.scripted_model import STAND_IN_NAME, ScriptedModel, needle_policy

    # The stand-in costs nothing; say so, rather than warn that it has no price.
    os.environ["LLM_PRICES"] = json.dumps({STAND_IN_NAME: [0.0, 0.0]})
    if args.trajectory:
        _writable(Path(args.trajectory), "--trajectory")
    needle = 4_000_000 + secrets.randbelow(999_999)
    context = haystack(args.size, needle)
    print(
        f"model: {STAND_IN_NAME}: a scripted stand-in, NOT a language model; it plays the "
        "root and sub-models so the loop, sandbox and sub-calls can be seen without a key"
    )
    print(f"context: {len(context):,} characters of generated text with one magic number hidden")
    progress = Progress(verbose=True)
    with ScriptedModel(needle_policy) as model:
        rlm = RLM({"base_url": model.base_url, "api_key": "none", "model_name": STAND_IN_NAME},
                  on_event=progress)  # fmt: skip
        try:
            _load_sandbox(progress)
            with progress:
                result = rlm.completion(context, root_prompt="What is the magic number?")
        finally:
            rlm.close()
    print(f"answer: {result.response} (expected {needle})")
    if args.trajectory:
        _write_trajectory(Path(args.trajectory), result.metadata["trajectory"])
        print(f"trajectory: {args.trajectory} (a page of it: `rlm view {args.trajectory}`)")
    return 0 if result.response == str(needle) else 1


# ----------------------------------------------------------------------------- serve, view


def _serve(args: argparse.Namespace) -> int:
    from functions.local import ServeError, ServeOptions, serve

    for name in ("LLM_BASE_URL", "LLM_MODEL"):
        if not os.environ.get(name):
            raise UsageError(LLM_SETTINGS_HINT)
    env = {
        **os.environ,
        "RLM_TOKEN_KEY": os.environ.get("RLM_TOKEN_KEY") or secrets.token_urlsafe(32),
        "LLM_API_KEY": os.environ.get("LLM_API_KEY") or "none",
        "INFER_AUTH": os.environ.get("INFER_AUTH", "none"),  # local: no callers' API keys
    }
    options = ServeOptions(
        host=args.host,
        port=args.port,
        execute_port=args.execute_port or args.port + 1,
        max_runs=args.max_runs,
        threads=args.threads or 0,
    )
    try:
        return serve(options, env, lambda text: print(text, flush=True))
    except ServeError as e:
        raise UsageError(str(e)) from None


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
    try:
        target.write_text(render(entries, title=source.name), encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot write {target}: {e.strerror}") from None
    print(target)
    return 0


# ----------------------------------------------------------------------------- parser


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _positive_float(text: str) -> float:
    value = _number(text)
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


def _positive(text: str) -> int:
    value = _count(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 must be at least 1")
    return value


def _port(text: str) -> int:
    value = _count(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"{text} is not a port (1-65535)")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        self.exit(2, f"rlm: {message}\n")


def _version() -> str:
    try:
        return version("knative-rlm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rlm", description="Recursive Language Models on a WebAssembly sandbox.")
    parser.add_argument("--version", action="version", version=f"rlm {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("ask", help="answer a question about a large context")
    p.add_argument("question")
    p.add_argument("--context", "-c", help="a file, an http(s) URL, or - for standard input")
    p.add_argument("--endpoint", help="a deployed infer function's URL (default: embedded)")
    p.add_argument("--base-url", help="OpenAI-compatible endpoint (default: $LLM_BASE_URL)")
    p.add_argument("--model", help="root model (default: $LLM_MODEL)")
    p.add_argument("--sub-model", help="model for llm_query (default: $LLM_SUB_MODEL or root)")
    p.add_argument("--max-depth", type=_count, help="recursion depth of rlm_query (0: none)")
    p.add_argument("--max-iterations", type=_positive, help="root turns before an answer is due")
    p.add_argument("--max-budget", type=_positive_float, help="USD")
    p.add_argument("--max-timeout", type=_positive_float, help="seconds")
    p.add_argument("--max-tokens", type=_positive)
    p.add_argument("--max-errors", type=_positive, help="failing cells in a row")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p.add_argument("--trajectory", help="write the run's trajectory (JSONL) here")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="the whole run: replies, code, output, sub-calls")  # fmt: skip
    p.set_defaults(run=_ask)

    p = sub.add_parser("demo", help="an offline run with a scripted stand-in model")
    p.add_argument("--size", type=_positive, default=2_000_000, help="context characters")
    p.add_argument("--trajectory", help="write the run's trajectory (JSONL) here")
    p.set_defaults(run=_demo)

    p = sub.add_parser("serve", help="run both functions locally, wired to each other")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", "--infer-port", type=_port, default=8080, help="infer's (8080)")
    p.add_argument("--execute-port", type=_port, help="execute's (default: --port + 1)")
    p.add_argument("--max-runs", type=_positive, default=8, help="runs at once (default 8)")
    p.add_argument("--threads", type=_positive,
                   help="each function's threads (default: enough for --max-runs)")  # fmt: skip
    p.set_defaults(run=_serve)

    p = sub.add_parser("mcp", help="serve the RLM as MCP tools on stdio, for an agent's config")
    p.set_defaults(run=_mcp)

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

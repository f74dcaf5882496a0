"""The `rlm` command: ask questions of large inputs, serve the functions, debug the sandbox."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class UsageError(Exception):
    """A bad argument or setting: printed as one line, exit code 2."""


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlm", description="Recursive Language Models on a WebAssembly sandbox."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("exec", help="run Python in the sandbox and print what it printed")
    p.add_argument("code", help="the code, or - to read it from standard input")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    p.add_argument("--json", action="store_true", help="print the full execute response")
    p.set_defaults(run=_exec)

    p = sub.add_parser("warm", help="pre-compile the sandbox (once per machine or image)")
    p.add_argument("cache_dir", nargs="?", help="cache folder (default: $WASI_PYTHON_CACHE)")
    p.set_defaults(run=_warm)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except UsageError as e:
        print(f"rlm: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

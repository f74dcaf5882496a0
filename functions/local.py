"""The command that serves one function on this machine (`rlm serve`, and the tests' processes)."""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def command(plane: str, host: str, port: int) -> list[str]:
    source = PACKAGE / plane / "main.py"
    return [sys.executable, "-m", "functions_framework", "--source", str(source),
            "--target", plane, "--host", host, "--port", str(port)]  # fmt: skip

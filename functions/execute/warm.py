"""Pre-compile the sandbox's wasm into the module cache, once, before serving.

    python -m functions.execute.warm [CACHE_DIR]

The directory (default: WASI_PYTHON_CACHE, read by the plane's settings) is made mode 0700;
the runtime reuses the compiled file only when it is owned by the uid that runs the process, so
run this as that uid.
"""

from __future__ import annotations

import os
import sys
import time

from functions.execute.settings import ExecuteSettings


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cache_dir = args[0] if args else ExecuteSettings.from_env().wasm_cache_dir
    if cache_dir:
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        os.chmod(cache_dir, 0o700)
    from functions.execute.sandbox import warm

    started = time.perf_counter()
    stats = warm(cache_dir or None)
    how = "compiled" if stats.get("compiled") else "loaded from the cache"
    where = cache_dir or "the default cache folder"
    print(f"sandbox ready in {time.perf_counter() - started:.1f} s ({how}; cache: {where})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

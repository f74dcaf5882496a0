"""Loading the RLM context a request names: inline, or fetched from a URL, size-capped."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import httpx

from functions import http
from functions.errors import Unprocessable
from functions.urls import Allowlist, Target


class ContextError(Unprocessable):
    """The context cannot be had: the message says why and what to send instead."""


def load_context(value: Any, uri: str | None, max_bytes: int, allowed: Allowlist) -> Any:
    """The served function's context: inline, or fetched from a URL `allowed` takes (the
    operator's INFER_CONTEXT_URL_PREFIXES; none set, no URL is fetched)."""
    if uri is None:
        return "" if value is None else value  # its size was bounded with the request body
    if value is not None:
        raise ContextError("send either context or context_uri, not both")
    if uri.startswith("file://"):
        raise ContextError("file:// context_uri is only for the embedded mode; send http(s)")
    if not allowed:
        raise ContextError(
            "this infer fetches no context_uri; send the context inline, or its operator allows "
            "URL prefixes in INFER_CONTEXT_URL_PREFIXES (a URL is fetched from infer's network)"
        )
    return fetch(uri, max_bytes, target=allowed.target(uri, "context_uri"))


def read_file(path: Path, max_bytes: int) -> Any:
    """A regular file's content (a device or a pipe could be read without end), at most
    `max_bytes` of it, as text (or JSON for a .json file)."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # before opening: a fifo's open() waits
            raise ContextError(f"context file {path} is not a regular file")
        with path.open("rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # swapped in the meantime
                raise ContextError(f"context file {path} is not a regular file")
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ContextError(f"cannot read context file {path}: {e.strerror}") from None
    if len(data) > max_bytes:
        raise ContextError(f"context file {path} is over the limit of {max_bytes} bytes")
    return decode(data, path.suffix == ".json")


def fetch(uri: str, max_bytes: int, timeout_s: float = 60.0, target: Target | None = None) -> Any:
    """GET `uri`; with a `target` (a URL the operator's list allows), at the address it was
    checked at and never past a redirect. Without one (the CLI's own URL), past redirects."""
    url, options = (target.connect_url, target.options()) if target else (uri, {})
    options.setdefault("follow_redirects", True)
    try:
        with http.client(timeout_s) as client, client.stream("GET", url, **options) as response:
            if response.status_code != 200:
                raise ContextError(f"context_uri answered {response.status_code}: {uri}")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise ContextError(f"context_uri content is over {max_bytes} bytes: {uri}")
                chunks.append(chunk)
            is_json = "json" in response.headers.get("content-type", "")
    except httpx.HTTPError as e:
        raise ContextError(f"cannot fetch context_uri {uri}: {e}") from None
    return decode(b"".join(chunks), is_json)


def decode(data: bytes, is_json: bool) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ContextError("context is not UTF-8 text") from None
    if is_json:
        try:
            return json.loads(text)
        except ValueError as e:
            raise ContextError(f"context is not valid JSON: {e}") from None
    return text

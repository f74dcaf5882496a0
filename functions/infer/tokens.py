"""Sub-call tokens: HMAC-SHA256 signed, scoped to one run and depth, expiring.

Format: base64url(JSON claims) "." base64url(HMAC-SHA256(key, first part)), no padding. There is
no header and so no algorithm to choose: anything but exactly that shape is refused. Only infer
holds the key; the execute plane passes the token through untouched, and any infer process with
the same key can verify it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from functions.errors import Forbidden, Unauthorized

MAX_TOKEN_CHARS = 8192
_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{43}")  # 43 chars: a 32-byte digest
KINDS = ("llm", "rlm", "tool")


class TokenClaims(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    run_id: str = Field(min_length=1)  # the run whose cell carries it (the root or a child)
    owner: str = Field(min_length=1)  # the caller who started the root run
    root: str = Field(min_length=1)  # the root run's id: its budget pays, its cancel stops
    depth: int = Field(ge=0)  # the depth of the run whose cells carry this token
    max_depth: int = Field(ge=0)
    exp: int  # unix seconds; the token is refused from this second on
    models: list[str]  # the models sub-calls may name; empty: any
    nonce: str = Field(min_length=1)  # one per cell (and marks a replayed cell)
    prompts: int = Field(ge=0)  # the most sub-call prompts (and tool calls) of the cell
    sub_model: str | None = None  # the default model of sub-calls
    by_depth: dict[str, str] = Field(default_factory=dict)  # depth -> default model there
    tools: dict[str, str] = Field(default_factory=dict)  # tool name -> sha256 of its spec
    sub_tools: str = ""  # sha256 of the children's tool catalog


class TokenError(Unauthorized):
    """A sub-call token was refused."""


class InvalidToken(TokenError):
    """Malformed, forged or signed with another key."""


class ExpiredToken(TokenError):
    """Well signed, but past its `exp`."""


class OutOfScope(Forbidden, TokenError):
    """Well signed and current, but it does not cover this sub-call."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(key: bytes, payload: str) -> bytes:
    return hmac.new(key, payload.encode("ascii"), hashlib.sha256).digest()


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray) or not key:
        raise ValueError("the token key must be non-empty bytes")


def mint(key: bytes, claims: TokenClaims) -> str:
    _check_key(key)
    payload = _b64(claims.model_dump_json().encode())
    return f"{payload}.{_b64(_signature(key, payload))}"


def verify(
    key: bytes, token: str, now: float | None = None, check_expiry: bool = True
) -> TokenClaims:
    """The claims of a token signed with `key`; raises `InvalidToken` or `ExpiredToken`."""
    _check_key(key)
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not _SHAPE.fullmatch(token):
        raise InvalidToken("invalid sub-call token")
    payload, _, signature = token.partition(".")
    try:
        given = _unb64(signature)
    except (binascii.Error, ValueError):
        raise InvalidToken("invalid sub-call token") from None
    # Comparing the decoded digest and then the encoding refuses a signature with other bits in
    # its last character's padding, so each token has exactly one valid spelling.
    if not hmac.compare_digest(_signature(key, payload), given) or _b64(given) != signature:
        raise InvalidToken("invalid sub-call token")
    try:
        claims = TokenClaims.model_validate(json.loads(_unb64(payload)))
    except (ValueError, ValidationError, binascii.Error, RecursionError):
        raise InvalidToken("invalid sub-call token") from None
    if check_expiry and (time.time() if now is None else now) >= claims.exp:
        raise ExpiredToken("sub-call token has expired")
    return claims


def check_scope(claims: TokenClaims, kind: str, model: str | None, depth: int | None = None) -> str:
    """Refuse (`OutOfScope`) a sub-call the token does not cover; else the kind that will run.

    `depth`, when the server knows it, is the depth of the run making the call: it must be the
    token's. An "rlm" call from a run at max_depth is no error: it runs as a plain "llm" call.
    """
    if kind not in KINDS:
        raise OutOfScope(f"sub-call kind {kind!r} is not one of {', '.join(KINDS)}")
    if claims.depth > claims.max_depth:
        raise OutOfScope(f"depth {claims.depth} is beyond max_depth {claims.max_depth}")
    if depth is not None and depth != claims.depth:
        raise OutOfScope(f"the token is for depth {claims.depth}, not {depth}")
    if model is not None and claims.models and model not in claims.models:
        allowed = ", ".join(claims.models)
        raise OutOfScope(f"model {model!r} is not allowed for this run (allowed: {allowed})")
    if kind == "tool":
        return kind
    return "rlm" if kind == "rlm" and claims.depth < claims.max_depth else "llm"

"""Sub-call tokens: HMAC-SHA256 signed, scoped to one run and depth, expiring.

Format: base64url(JSON claims) "." base64url(HMAC-SHA256(key, that first part)). Only infer
holds the key; the execute plane passes the token through untouched.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

from pydantic import BaseModel, ConfigDict, ValidationError


class TokenClaims(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run_id: str
    depth: int
    max_depth: int
    exp: int  # unix seconds
    models: list[str]  # the models sub-calls may name; empty: any
    nonce: str


class TokenError(Exception):
    status = 401


class InvalidToken(TokenError):
    pass


class ExpiredToken(TokenError):
    pass


class OutOfScope(TokenError):
    status = 403


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(key: bytes, payload: str) -> str:
    return _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())


def mint(key: bytes, claims: TokenClaims) -> str:
    payload = _b64(claims.model_dump_json().encode())
    return f"{payload}.{_sign(key, payload)}"


def verify(key: bytes, token: str, now: float | None = None) -> TokenClaims:
    payload, dot, signature = token.partition(".")
    if not dot or not hmac.compare_digest(_sign(key, payload), signature):
        raise InvalidToken("invalid sub-call token")
    try:
        claims = TokenClaims.model_validate(json.loads(_unb64(payload)))
    except (ValueError, ValidationError):
        raise InvalidToken("invalid sub-call token") from None
    if claims.exp < (time.time() if now is None else now):
        raise ExpiredToken("sub-call token has expired")
    return claims


def check_scope(claims: TokenClaims, kind: str, model: str | None) -> None:
    """Refuse a sub-call the token does not cover: a model outside its list."""
    if model is not None and claims.models and model not in claims.models:
        allowed = ", ".join(claims.models)
        raise OutOfScope(f"model {model!r} is not allowed for this run (allowed: {allowed})")
    if kind == "rlm" and claims.depth > claims.max_depth:
        raise OutOfScope("recursion deeper than max_depth")

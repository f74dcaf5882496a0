"""Sub-call tokens: signed, scoped, expiring; forged, expired and out-of-scope ones refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from functions.infer.tokens import (
    ExpiredToken,
    InvalidToken,
    OutOfScope,
    TokenClaims,
    TokenError,
    check_scope,
    mint,
    verify,
)

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
NOW = 1_800_000_000


def claims(**changes: object) -> TokenClaims:
    fields = {
        "run_id": "run-1",
        "depth": 0,
        "max_depth": 1,
        "exp": NOW + 60,
        "models": ["root-model", "sub-model"],
        "nonce": "cell-1",
        "owner": "anonymous",
        "root": "run-1",
        "prompts": 100,
    }
    return TokenClaims(**{**fields, **changes})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(payload: dict | bytes, key: bytes = KEY) -> str:
    """A token built by hand, signed correctly: what someone holding the key could make."""
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    head = b64(raw)
    return f"{head}.{b64(hmac.new(key, head.encode(), hashlib.sha256).digest())}"


def test_round_trip() -> None:
    token = mint(KEY, claims())
    assert verify(KEY, token, now=NOW) == claims()
    assert "=" not in token and token.count(".") == 1


def test_verify_uses_the_clock_by_default() -> None:
    token = mint(KEY, claims(exp=int(time.time()) + 60))
    assert verify(KEY, token).run_id == "run-1"
    with pytest.raises(ExpiredToken):
        verify(KEY, mint(KEY, claims(exp=int(time.time()) - 1)))


def test_expiry_is_exclusive() -> None:
    token = mint(KEY, claims(exp=NOW))
    verify(KEY, token, now=NOW - 0.001)
    with pytest.raises(ExpiredToken) as e:
        verify(KEY, token, now=NOW)
    assert e.value.status == 401


def test_another_key_is_refused() -> None:
    with pytest.raises(InvalidToken) as e:
        verify(OTHER_KEY, mint(KEY, claims()), now=NOW)
    assert e.value.status == 401


def test_a_changed_payload_is_refused() -> None:
    token = mint(KEY, claims())
    payload, signature = token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["max_depth"] = 8
    with pytest.raises(InvalidToken):
        verify(KEY, f"{b64(json.dumps(forged).encode())}.{signature}", now=NOW)


def test_every_changed_character_is_refused() -> None:
    token = mint(KEY, claims())
    for i, char in enumerate(token):
        if char == ".":
            continue
        swapped = "A" if char != "A" else "B"
        with pytest.raises(InvalidToken):
            verify(KEY, token[:i] + swapped + token[i + 1 :], now=NOW)


def test_a_second_spelling_of_the_signature_is_refused() -> None:
    token = mint(KEY, claims())
    payload, signature = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(signature[-1])
    # The last of 43 characters carries 4 bits of digest and 2 unused ones.
    other = alphabet[last ^ 1]
    with pytest.raises(InvalidToken):
        verify(KEY, f"{payload}.{signature[:-1]}{other}", now=NOW)


@pytest.mark.parametrize(
    "token",
    [
        "",
        ".",
        "abc",
        "abc.",
        ".abc",
        "a.b.c",
        "eyJhbGciOiJub25lIn0.eyJydW5faWQiOiJ4In0.",  # a JWT with alg "none"
        "é.é",
        "\x00.\x00",
        "a" * 10_000 + "." + "b" * 43,
        "Bearer abc.def",
    ],
)
def test_garbage_is_invalid(token: str) -> None:
    with pytest.raises(InvalidToken):
        verify(KEY, token, now=NOW)


def test_non_strings_are_invalid() -> None:
    for token in (None, b"abc.def", 42):
        with pytest.raises(InvalidToken):
            verify(KEY, token, now=NOW)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[]",
        b"null",
        b'{"run_id": "r"}',
        {**claims().model_dump(), "alg": "none"},  # unknown fields
        {**claims().model_dump(), "depth": "0"},  # strings are not numbers
        {**claims().model_dump(), "depth": True},
        {**claims().model_dump(), "depth": -1},
        {**claims().model_dump(), "exp": 1.5e9},
        {**claims().model_dump(), "models": "root-model"},
        {**claims().model_dump(), "nonce": ""},
        b"\xff\xfe",
        b"[" * 5000,
    ],
)
def test_well_signed_but_malformed_claims_are_invalid(payload: dict | bytes) -> None:
    with pytest.raises(InvalidToken):
        verify(KEY, signed(payload), now=NOW)


def test_an_empty_key_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        mint(b"", claims())
    with pytest.raises(ValueError):
        verify(b"", mint(KEY, claims()), now=NOW)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200) | st.from_regex(r"[A-Za-z0-9_-]{1,80}\.[A-Za-z0-9_-]{43}"))
def test_verify_raises_only_token_errors(token: str) -> None:
    with pytest.raises(TokenError):
        verify(KEY, token, now=NOW)


# ----------------------------------------------------------------------------- scope


def test_scope_allows_listed_models_and_the_default() -> None:
    c = claims()
    assert check_scope(c, "llm", "sub-model") == "llm"
    assert check_scope(c, "llm", None) == "llm"
    assert check_scope(c, "rlm", "root-model") == "rlm"


def test_scope_refuses_other_models() -> None:
    with pytest.raises(OutOfScope) as e:
        check_scope(claims(), "llm", "gpt-expensive")
    assert e.value.status == 403
    assert "gpt-expensive" in str(e.value)


def test_an_empty_model_list_allows_any_model() -> None:
    assert check_scope(claims(models=[]), "llm", "anything") == "llm"


def test_rlm_at_max_depth_runs_as_llm() -> None:
    assert check_scope(claims(depth=1, max_depth=1), "rlm", None) == "llm"
    assert check_scope(claims(depth=0, max_depth=0), "rlm", None) == "llm"


def test_scope_refuses_unknown_kinds_and_impossible_depths() -> None:
    with pytest.raises(OutOfScope):
        check_scope(claims(), "shell", None)
    with pytest.raises(OutOfScope):
        check_scope(claims(depth=3, max_depth=2), "llm", None)


def test_scope_checks_the_depth_the_server_knows() -> None:
    assert check_scope(claims(depth=1, max_depth=2), "rlm", None, depth=1) == "rlm"
    with pytest.raises(OutOfScope):
        check_scope(claims(depth=1, max_depth=2), "rlm", None, depth=0)

"""Who may spend the operator's model key: callers' API keys and each key's ceilings.

The operator gives each caller a key (`Authorization: Bearer <key>`) and lists the keys'
sha256 digests, never the keys, as JSON in `INFER_API_KEYS` or in the file
`INFER_API_KEYS_FILE` names (a mounted Secret; re-read when it changes, so a revocation needs
no restart):

    {"alice": {"sha256": "<hex digest of the key>", "max_run_usd": 2, "max_day_usd": 50,
               "max_runs": 4, "models": ["gpt-4.1-mini"]},
     "metrics": {"sha256": "...", "operator": true, "max_runs": 0},
     "mallory": {"sha256": "...", "revoked": true}}

A key's name is its caller's identity: the owner of the runs it starts. Its ceilings (each
optional): USD per run (a larger `max_budget_usd` is 403; the run's budget never exceeds it),
USD per UTC day (a run reserves its budget against what is left and gives back what it did not
spend; none left is 429 until midnight), runs at once (more is 429), the models its requests may
name (403 for another), and `operator` (may read /metrics and /openapi.json). The day's spend
and the runs in progress are kept in the run ledger's store (`StoreCounters`), so the
ceilings hold across every infer pod that shares it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from functions.config import ConfigError
from functions.errors import Forbidden, TooManyRequests, Unauthorized, Unavailable
from functions.infer.ledger import ANONYMOUS, Store

log = logging.getLogger("rlm.infer")

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"
MAX_KEY_CHARS = 512
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] ([A-Za-z0-9._~+/-]+=*)")
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="rlm"'}
_BUSY_RETRY_S = 5
_SMALLEST_RUN_USD = 0.0001  # less left for today than this and no run starts


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: its key's name and ceilings (None: no ceiling of its own)."""

    name: str
    operator: bool = False
    max_run_usd: float | None = None
    max_day_usd: float | None = None
    max_runs: int | None = None
    models: frozenset[str] | None = None


# The caller of the embedded mode and of a server with INFER_AUTH=none: the operator itself,
# the owner the ledger calls anonymous.
LOCAL = Caller(ANONYMOUS, operator=True)


class KeySpec(BaseModel):
    """One entry of the key list."""

    model_config = ConfigDict(extra="forbid", strict=True)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    max_run_usd: float | None = Field(default=None, gt=0)
    max_day_usd: float | None = Field(default=None, gt=0)
    max_runs: int | None = Field(default=None, ge=0)
    models: list[str] | None = None
    operator: bool = False
    revoked: bool = False


@dataclass(frozen=True)
class _Key:
    digest: bytes
    caller: Caller
    revoked: bool


def parse_keys(text: str, source: str) -> list[_Key]:
    """The key list; `ConfigError` naming `source` and the entry for anything malformed."""
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{source} is not JSON: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f'{source} must be a JSON object of keys by name: {{"name": {{...}}}}')
    keys, seen = [], set()
    for name, entry in raw.items():
        if not re.fullmatch(NAME_PATTERN, name) or name == ANONYMOUS:
            raise ConfigError(
                f"{source}: key name {name!r} must match {NAME_PATTERN} and not be {ANONYMOUS!r}"
            )
        try:
            spec = KeySpec.model_validate(entry)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'entry'}: {err['msg']}" for err in e.errors()
            )
            raise ConfigError(f"{source}[{name!r}]: {problems}") from None
        digest = bytes.fromhex(spec.sha256)
        if digest in seen:
            raise ConfigError(f"{source}[{name!r}]: the same key digest is listed twice")
        seen.add(digest)
        models = frozenset(spec.models) if spec.models is not None else None
        caller = Caller(name, spec.operator, spec.max_run_usd, spec.max_day_usd, spec.max_runs,
                        models)  # fmt: skip
        keys.append(_Key(digest, caller, spec.revoked))
    return keys


def digest_of(key: str) -> str:
    """The sha256 hex digest an operator lists for `key`."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """The callers' keys: from JSON text, or from a file read again whenever it changes."""

    def __init__(self, text: str = "", path: str = "") -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._broken: str | None = None
        self._keys = parse_keys(text, "INFER_API_KEYS") if text else self._read()

    def _read(self) -> list[_Key]:
        try:
            info = os.stat(self.path)
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"INFER_API_KEYS_FILE={self.path}: cannot read it: {e}") from None
        keys = parse_keys(text, f"INFER_API_KEYS_FILE={self.path}")
        self._stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
        return keys

    def keys(self) -> list[_Key]:
        """The current list. A file that changed is read again; one that became unreadable or
        malformed refuses every key (503) until it is fixed, rather than keep a revoked one."""
        if not self.path:
            return self._keys
        with self._lock:
            try:
                info = os.stat(self.path)
                stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
                if stamp != self._stamp:
                    self._keys, self._broken = self._read(), None
                    log.info("API keys read again from %s (%d keys)", self.path, len(self._keys))
            except ConfigError as e:
                if self._broken != e.message:
                    log.error("API keys: %s; every request is refused until it is fixed", e)
                self._broken = e.message
            except OSError as e:
                self._broken = f"INFER_API_KEYS_FILE={self.path}: {e}"
            if self._broken:
                raise Unavailable("this server's API key list cannot be read; its operator "
                                  "has been told", retry_after_s=30)  # fmt: skip
            return self._keys

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller whose key `authorization` ("Bearer <key>") carries; `Unauthorized` with
        the reason for a missing, malformed, unknown or revoked key."""
        if not authorization:
            raise Unauthorized(
                "this server needs an API key: send Authorization: Bearer <key>",
                headers=dict(_CHALLENGE),
            )
        m = _BEARER.fullmatch(authorization.strip())
        if not m or len(m[1]) > MAX_KEY_CHARS:
            raise Unauthorized(
                "malformed Authorization header: send Authorization: Bearer <key>",
                headers={"WWW-Authenticate": 'Bearer realm="rlm", error="invalid_request"'},
            )
        presented = hashlib.sha256(m[1].encode()).digest()
        found = None
        for key in self.keys():  # every digest is compared, each in constant time
            if hmac.compare_digest(presented, key.digest):
                found = key
        invalid = {"WWW-Authenticate": 'Bearer realm="rlm", error="invalid_token"'}
        if found is None:
            raise Unauthorized("unknown API key", headers=invalid)
        if found.revoked:
            raise Unauthorized(f"API key {found.caller.name!r} was revoked", headers=invalid)
        return found.caller


class Counters(Protocol):
    """What each key has spent today and the runs it has in progress, the same for every infer
    pod; each method is atomic."""

    def spent_today(self, name: str) -> float:
        """USD charged to `name` on the current UTC day."""
        ...

    def charge(self, name: str, usd: float, limit: float | None = None, day: str | None = None
               ) -> bool:  # fmt: skip
        """Add `usd` (negative: give back) to `name`'s spend of `day` (default today, UTC:
        "YYYY-MM-DD"), unless that would take it above `limit`: then change nothing and
        answer False."""
        ...

    def acquire_run(self, name: str, run_id: str, limit: int, ttl_s: float) -> bool:
        """Count run `run_id` as in progress for `name` unless `limit` others already are; a
        run not released within `ttl_s` (its pod died) stops counting by itself."""
        ...

    def release_run(self, name: str, run_id: str) -> None:
        """The run ended; releasing one not held is no error."""
        ...


class StoreCounters:
    """`Counters` in the run ledger's store: this process's memory, or the Redis that every
    infer pod shares."""

    DAY_KEPT_S = 2 * 86400.0

    def __init__(self, store: Store) -> None:
        self.store = store

    @staticmethod
    def _key(name: str) -> str:
        return "caller:" + hashlib.sha256(name.encode()).hexdigest()[:32]

    def spent_today(self, name: str) -> float:
        return self.store.counters(f"{self._key(name)}:day:{today()}").get("usd", 0.0)

    def charge(self, name: str, usd: float, limit: float | None = None, day: str | None = None
               ) -> bool:  # fmt: skip
        caps = {} if limit is None else {"usd": limit}
        key = f"{self._key(name)}:day:{day or today()}"
        return self.store.add(key, {"usd": usd}, caps, self.DAY_KEPT_S) is not None

    def acquire_run(self, name: str, run_id: str, limit: int, ttl_s: float) -> bool:
        return self.store.hold(f"{self._key(name)}:runs", run_id, limit, ttl_s)

    def release_run(self, name: str, run_id: str) -> None:
        self.store.unhold(f"{self._key(name)}:runs", run_id)


def today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def seconds_to_midnight() -> int:
    """Until the next UTC day (Unix time has no leap seconds: every day is 86,400 s)."""
    return 86400 - int(time.time()) % 86400


@dataclass
class Ticket:
    """A run a caller was admitted for: its budget (reserved against the day's ceiling) and
    its place among the key's runs in progress. `settle` once, with what the run spent."""

    caller: Caller
    run_id: str
    budget_usd: float | None
    counters: Counters
    reserved_usd: float = 0.0
    day: str = field(default_factory=today)
    holds_run: bool = False
    _settled: bool = False

    def settle(self, spent_usd: float) -> None:
        if self._settled:
            return
        self._settled = True
        self.counters.charge(self.caller.name, spent_usd - self.reserved_usd, day=self.day)
        if self.holds_run:
            self.counters.release_run(self.caller.name, self.run_id)


def key_ring(auth: str, keys_json: str, keys_file: str) -> KeyRing | None:
    """The served function's keys (`INFER_API_KEYS` or `INFER_API_KEYS_FILE`); None in local
    mode (`INFER_AUTH=none`). `ConfigError` for a list that cannot be read."""
    return None if auth == "none" else KeyRing(keys_json, keys_file)


def authenticate(keys: KeyRing | None, authorization: str | None) -> Caller:
    """The caller an Authorization header names; in local mode, the operator (`LOCAL`)."""
    return LOCAL if keys is None else keys.authenticate(authorization)


class Admission:
    """Admits a caller's runs within its key's ceilings."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters

    def admit(
        self,
        caller: Caller,
        run_id: str,
        models: list[str],
        asked_usd: float | None,
        budget_usd: float | None,
        ttl_s: float,
    ) -> Ticket:
        """Admit a run that may use `models`, asked for `asked_usd` (None: it asked none) and
        would get `budget_usd`; `Forbidden` or `TooManyRequests` (with Retry-After) when the
        caller's key does not allow it. The ticket's budget is what the run may spend."""
        name = caller.name
        if caller.max_runs == 0:
            raise Forbidden(f"API key {name!r} may not start runs")
        if caller.models is not None:
            outside = [m for m in models if m not in caller.models]
            if outside:
                allowed = ", ".join(sorted(caller.models)) or "none"
                raise Forbidden(f"API key {name!r} may not use model {outside[0]!r} "
                                f"(its models: {allowed})")  # fmt: skip
        budget = budget_usd
        if caller.max_run_usd is not None:
            if asked_usd is not None and asked_usd > caller.max_run_usd:
                raise Forbidden(f"max_budget_usd {asked_usd:g} is above API key {name!r}'s "
                                f"ceiling of ${caller.max_run_usd:g} per run: ask for at most "
                                "that")  # fmt: skip
            budget = min(budget or caller.max_run_usd, caller.max_run_usd)
        ticket = Ticket(caller, run_id, budget, self.counters)
        if caller.max_day_usd is not None:
            ticket.reserved_usd = self._reserve(caller, asked_usd, budget, ticket.day)
            ticket.budget_usd = ticket.reserved_usd
        if caller.max_runs is not None:
            if not self.counters.acquire_run(name, run_id, caller.max_runs, ttl_s):
                ticket.settle(0.0)
                raise TooManyRequests(
                    f"API key {name!r} has {caller.max_runs} runs in progress, its most: retry "
                    "when one ends",
                    headers={"Retry-After": str(_BUSY_RETRY_S)},
                )
            ticket.holds_run = True
        return ticket

    def _reserve(self, caller: Caller, asked: float | None, budget: float | None, day: str
                 ) -> float:  # fmt: skip
        """Reserve the run's budget against what the key has left today: all of it when the
        request asked for it, else as much of the default as is left."""
        limit = caller.max_day_usd or 0.0
        left = limit - self.counters.spent_today(caller.name)
        wait = {"Retry-After": str(seconds_to_midnight())}
        if left < _SMALLEST_RUN_USD:
            raise TooManyRequests(f"API key {caller.name!r} has spent its ${limit:g} for today "
                                  "(UTC): retry after midnight UTC", headers=wait)  # fmt: skip
        if asked is not None and asked > left:
            raise TooManyRequests(
                f"API key {caller.name!r} has ${left:.4f} of its ${limit:g} left today (UTC): "
                "ask for at most that, or retry after midnight UTC",
                headers=wait,
            )
        reserve = min(budget or left, left)
        if not self.counters.charge(caller.name, reserve, limit, day):
            raise TooManyRequests(
                f"API key {caller.name!r}'s other runs have just reserved what was left of its "
                f"${limit:g} for today: retry shortly",
                headers={"Retry-After": str(_BUSY_RETRY_S)},
            )
        return reserve

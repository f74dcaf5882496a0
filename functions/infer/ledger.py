"""The run ledger: the one authority on every run, shared by every infer process.

Any infer pod may serve a run's callbacks, its cancel, its CloudEvent redelivery or its
conversation's next turn, so what a run is allowed and what it has spent lives here, not in a
process's memory: owner, status, cancel flag, the current cell and its prompt count, spend
(reserved before a model is called, settled after), child runs, each cell's sub-call log, the
replay memo, conversations and answered CloudEvents.

Two stores hold it: `MemoryStore` in this process (embedded, `rlm serve`) and `RedisStore`
(`INFER_STORE_URL`, every deployment with more than one infer process). Both implement the
same few primitives; the rules are written once, in `Ledger`. Every key expires. A store that
cannot be reached raises `LedgerUnavailable` (503 with Retry-After), never a fallback to memory.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from functions.contract import ModelUsage, UsageByModel
from functions.errors import Conflict, Forbidden, NotFound, Unauthorized, Unavailable

ANONYMOUS = "anonymous"  # the owner of runs when callers are not authenticated (local mode)
HEARTBEAT_S = 2.0  # how often a run's process says it is alive
DEAD_AFTER_S = 3 * HEARTBEAT_S  # a run whose process has not said so for this long is resumed


class LedgerUnavailable(Unavailable):
    """The run ledger cannot be reached, or refuses (full, no permission); the pod recovers by
    itself when it is back."""

    def __init__(self, why: str) -> None:
        super().__init__(f"the run ledger {why}; retry shortly", retry_after_s=2)


class BudgetRefused(Forbidden):
    """A reservation the run's remaining budget cannot cover: nothing was called."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code  # the StopCode value of the budget


# ----------------------------------------------------------------------------- stores


class Store(Protocol):
    """The primitives the ledger needs; each is atomic."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes, ttl_s: float, only_if_absent: bool = False) -> bool:
        """Set `key`; with `only_if_absent`, only if it does not exist (False then)."""
        ...

    def delete(self, key: str) -> None: ...

    def add(
        self, key: str, amounts: dict[str, float], caps: dict[str, float], ttl_s: float
    ) -> dict[str, float] | None:
        """Add `amounts` to the counters of hash `key`, unless a positive amount would take a
        capped counter past its cap: then change nothing and return None."""
        ...

    def counters(self, key: str) -> dict[str, float]: ...

    def push(self, key: str, value: bytes, ttl_s: float) -> None: ...

    def pop_all(self, key: str) -> list[bytes]: ...

    def pop_first(self, key: str) -> bytes | None: ...

    def hold(self, key: str, member: str, limit: int, ttl_s: float) -> bool:
        """Hold `member` in the set `key` for `ttl_s` (again, if it is there), unless `limit`
        members whose time has not run out are there already: then False."""
        ...

    def unhold(self, key: str, member: str) -> None: ...


class MemoryStore:
    """The ledger in this process's memory: one process is the whole deployment."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._items: dict[str, tuple[Any, float]] = {}
        self._lock = threading.Lock()
        self._clock = clock
        self._next_sweep = 0.0

    def _live(self, key: str) -> Any:
        item = self._items.get(key)
        if item is None:
            return None
        if item[1] <= self._clock():
            del self._items[key]
            return None
        return item[0]

    def _set(self, key: str, value: Any, ttl_s: float) -> None:
        now = self._clock()
        self._items[key] = (value, now + ttl_s)
        if now >= self._next_sweep:  # expired keys nobody asks for again go too
            self._next_sweep = now + 60
            for k in [k for k, (_, t) in self._items.items() if t <= now]:
                del self._items[k]

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._live(key)

    def put(self, key: str, value: bytes, ttl_s: float, only_if_absent: bool = False) -> bool:
        with self._lock:
            if only_if_absent and self._live(key) is not None:
                return False
            self._set(key, value, ttl_s)
            return True

    def delete(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)

    def add(
        self, key: str, amounts: dict[str, float], caps: dict[str, float], ttl_s: float
    ) -> dict[str, float] | None:
        with self._lock:
            current = dict(self._live(key) or {})
            for name, amount in amounts.items():
                cap = caps.get(name)
                if cap is not None and amount > 0 and current.get(name, 0.0) + amount > cap:
                    return None
            for name, amount in amounts.items():
                current[name] = current.get(name, 0.0) + amount
            self._set(key, current, ttl_s)
            return dict(current)

    def counters(self, key: str) -> dict[str, float]:
        with self._lock:
            return dict(self._live(key) or {})

    def push(self, key: str, value: bytes, ttl_s: float) -> None:
        with self._lock:
            items = self._live(key) or deque()
            items.append(value)
            self._set(key, items, ttl_s)

    def pop_all(self, key: str) -> list[bytes]:
        with self._lock:
            items = self._live(key)
            self._items.pop(key, None)
            return list(items or ())

    def pop_first(self, key: str) -> bytes | None:
        with self._lock:
            items = self._live(key)
            return items.popleft() if items else None

    def hold(self, key: str, member: str, limit: int, ttl_s: float) -> bool:
        with self._lock:
            now = self._clock()
            members = {m: t for m, t in (self._live(key) or {}).items() if t > now}
            if member not in members and len(members) >= limit:
                return False
            members[member] = now + ttl_s
            self._set(key, members, max(members.values()) - now)
            return True

    def unhold(self, key: str, member: str) -> None:
        with self._lock:
            members = self._live(key)
            if members:
                members.pop(member, None)


_ADD = """
local n = tonumber(ARGV[2])
for i = 0, n - 1 do
  local cap = ARGV[5 + i * 3]
  local amount = tonumber(ARGV[4 + i * 3])
  if cap ~= '' and amount > 0 then
    local now = tonumber(redis.call('HGET', KEYS[1], ARGV[3 + i * 3]) or '0')
    if now + amount > tonumber(cap) then return false end
  end
end
local out = {}
for i = 0, n - 1 do
  out[#out + 1] = ARGV[3 + i * 3]
  out[#out + 1] = redis.call('HINCRBYFLOAT', KEYS[1], ARGV[3 + i * 3], ARGV[4 + i * 3])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return out
"""

_HOLD = """
local now = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1])
   and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
return 1
"""

_POP_ALL = """
local items = redis.call('LRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
return items
"""


class RedisStore:
    """The ledger in Redis, shared by every infer process of a deployment (redis-py)."""

    def __init__(self, url: str, password: str | None = None, timeout_s: float = 2.0) -> None:
        import redis

        self._errors = (redis.RedisError, OSError)
        self._refusals = redis.ResponseError  # the server answered: full, no permission, ...
        self._redis = redis.Redis.from_url(
            url,
            password=password or None,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=30,
            retry_on_timeout=False,
        )
        self._add = self._redis.register_script(_ADD)
        self._pop_all = self._redis.register_script(_POP_ALL)
        self._hold = self._redis.register_script(_HOLD)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._refusals as e:
            raise LedgerUnavailable(f"refused: {str(e)[:200]}") from None
        except self._errors as e:
            raise LedgerUnavailable(f"is unreachable ({type(e).__name__})") from None

    def get(self, key: str) -> bytes | None:
        return self._call(self._redis.get, key)

    def put(self, key: str, value: bytes, ttl_s: float, only_if_absent: bool = False) -> bool:
        done = self._call(self._redis.set, key, value, px=_ms(ttl_s), nx=only_if_absent)
        return bool(done)

    def delete(self, key: str) -> None:
        self._call(self._redis.delete, key)

    def add(
        self, key: str, amounts: dict[str, float], caps: dict[str, float], ttl_s: float
    ) -> dict[str, float] | None:
        args: list[Any] = [_ms(ttl_s), len(amounts)]
        for name, amount in amounts.items():
            cap = caps.get(name)
            args += [name, repr(float(amount)), "" if cap is None else repr(float(cap))]
        out = self._call(self._add, keys=[key], args=args)
        if out is None:
            return None
        return {out[i].decode(): float(out[i + 1]) for i in range(0, len(out), 2)}

    def counters(self, key: str) -> dict[str, float]:
        found = self._call(self._redis.hgetall, key)
        return {k.decode(): float(v) for k, v in found.items()}

    def push(self, key: str, value: bytes, ttl_s: float) -> None:
        pipe = self._redis.pipeline()
        pipe.rpush(key, value)
        pipe.pexpire(key, _ms(ttl_s))
        self._call(pipe.execute)

    def pop_all(self, key: str) -> list[bytes]:
        return list(self._call(self._pop_all, keys=[key]))

    def pop_first(self, key: str) -> bytes | None:
        return self._call(self._redis.lpop, key)

    def hold(self, key: str, member: str, limit: int, ttl_s: float) -> bool:
        now_ms = int(time.time() * 1000)  # the pods' clocks; a place lasts minutes, not ms
        args = [member, limit, _ms(ttl_s), now_ms]
        return bool(self._call(self._hold, keys=[key], args=args))

    def unhold(self, key: str, member: str) -> None:
        self._call(self._redis.zrem, key, member)

    def ping(self) -> None:
        self._call(self._redis.ping)


def _ms(seconds: float) -> int:
    return max(1, int(min(seconds, 10 * 365 * 86400) * 1000))


# ----------------------------------------------------------------------------- the rules


@dataclass(frozen=True)
class RunKey:
    """A run as the ledger knows it: run ids are scoped to their owner."""

    owner: str
    run_id: str

    @property
    def id(self) -> str:
        digest = hashlib.sha256(f"{self.owner}\0{self.run_id}".encode()).hexdigest()[:32]
        return f"run:{digest}"


MIN_OUTPUT_TOKENS = 16  # a call that may not answer with at least this many is not made


@dataclass(frozen=True)
class Reservation:
    usd: float
    tokens: float
    output_tokens: int  # the call's output cap: sent to the model, so it cannot spend more


class Ledger:
    """What every infer process agrees on about runs, cells, spend, conversations and events."""

    def __init__(self, store: Store, run_ttl_s: float = 24 * 3600.0) -> None:
        self.store = store
        self.run_ttl_s = run_ttl_s

    # ------------------------------------------------------------------ runs

    def open_run(
        self,
        key: RunKey,
        budget_usd: float | None,
        budget_tokens: int | None,
        ttl_s: float,
        secret: str | None = None,
    ) -> tuple[str, dict[str, Any] | None]:
        """Record a new live run of `key.owner`: its secret (for cancelling it in local mode; the
        caller's own when it chose one), and None. A run of that id whose process died (its
        heartbeat stopped) is taken over instead: its secret and its last checkpoint.

        `Conflict` when that owner has a live run with that id, still beating."""
        ttl = min(ttl_s, self.run_ttl_s)
        record = {"status": "running", "secret": secret or secrets.token_urlsafe(16),
                  "usd": budget_usd, "tokens": budget_tokens,
                  "expires": time.time() + ttl}  # fmt: skip
        if not self.store.put(key.id, _dump(record), ttl, only_if_absent=True):
            old = _load(self.store.get(key.id)) or {}
            if old.get("status") == "running":
                if self.store.get(key.id + ":alive") is not None:
                    raise Conflict(f"run {key.run_id!r} is already running")
                self.heartbeat(key)
                return old["secret"], _load(self.store.get(key.id + ":checkpoint"))
            self.store.put(key.id, _dump(record), ttl)
        for suffix in (":cancel", ":stop", ":spend", ":children", ":checkpoint"):
            self.store.delete(key.id + suffix)
        self.heartbeat(key)
        return record["secret"], None

    def heartbeat(self, key: RunKey) -> None:
        """The run's process is alive; a run whose beat stops for `DEAD_AFTER_S` may be resumed."""
        self.store.put(key.id + ":alive", b"1", DEAD_AFTER_S)

    def checkpoint(self, key: RunKey, state: dict[str, Any]) -> None:
        """Where the run is: what another process resumes it from if this one dies."""
        self.store.put(key.id + ":checkpoint", _dump(state), self.run_ttl_s)

    def finish_run(self, key: RunKey, status: str) -> None:
        record = _load(self.store.get(key.id)) or {}
        record["status"] = status
        self.store.put(key.id, _dump(record), self.run_ttl_s)
        self.store.delete(key.id + ":alive")
        self.store.delete(key.id + ":checkpoint")

    def _record(self, key: RunKey) -> dict[str, Any] | None:
        return _load(self.store.get(key.id))

    def cancel(self, key: RunKey, secret: str | None = None) -> bool:
        """Cancel `key`'s run. Only its owner reaches it (run ids are scoped to owners); in
        local mode, where every caller is the same owner, the run's secret is needed too."""
        record = self._record(key)
        if record is None or record.get("status") != "running":
            raise NotFound(f"no run {key.run_id!r} of yours is in progress")
        if key.owner == ANONYMOUS and not hmac.compare_digest(
            str(secret or ""), str(record.get("secret"))
        ):
            raise Forbidden("cancelling this run needs its cancel_token (given when it started)")
        self.mark_cancelled(key)
        return True

    def mark_cancelled(self, key: RunKey) -> None:
        self.store.put(key.id + ":cancel", b"1", self.run_ttl_s)

    def cancelled(self, key: RunKey) -> bool:
        return self.store.get(key.id + ":cancel") is not None

    def stop(self, key: RunKey, code: str, reason: str) -> None:
        """A budget ran out where money is spent: the run stops at its next step."""
        self.store.put(key.id + ":stop", _dump([code, reason]), self.run_ttl_s, only_if_absent=True)

    def stopped(self, key: RunKey) -> tuple[str, str] | None:
        found = _load(self.store.get(key.id + ":stop"))
        return None if found is None else (found[0], found[1])

    # ------------------------------------------------------------------ cells

    def open_cell(self, root: RunKey, run_id: str, nonce: str, replay: bool, ttl_s: float) -> None:
        """`nonce` is the current cell of run `run_id` (the root or one of its children) until
        the next one; a rebuilt session's replayed cells have a slot of their own."""
        self.store.put(_cell_slot(root, run_id, replay), nonce.encode(), ttl_s)

    def take_prompts(self, root: RunKey, run_id: str, nonce: str, count: int, cap: int) -> float:
        """Count `count` prompts against the cell's cap; refuse a cell that is not current.
        Returns the seconds the run may still go on (what it keeps lives no longer)."""
        record = self._record(root)
        if record is None or record.get("status") != "running":
            raise Unauthorized("sub-call token of a run that has ended")
        replay = nonce.startswith("replay-")
        if self.store.get(_cell_slot(root, run_id, replay)) != nonce.encode():
            raise Unauthorized("sub-call token of a cell that has ended")
        taken = self.store.add(
            f"{root.id}:prompts:{nonce}", {"prompts": count}, {"prompts": cap}, self.run_ttl_s
        )
        if taken is None:
            raise Forbidden(f"sub-call limit reached: at most {cap} prompts per cell")
        return self._lifetime(record)

    # ------------------------------------------------------------------ spend

    def budgets(self, key: RunKey) -> dict[str, float]:
        """The run's budgets as the ledger caps its spend: "usd" and "tokens", where set."""
        record = self._record(key) or {}
        return {name: float(record[name]) for name in ("usd", "tokens") if record.get(name)
                is not None}  # fmt: skip

    def reserve(
        self,
        key: RunKey,
        input_tokens: int,
        output_cap: int,
        price: tuple[float, float],
        caps: dict[str, float] | None = None,
    ) -> Reservation:
        """Hold a model call's worst case before it is made: `input_tokens` (an estimate from
        above) and as many output tokens as the run's budgets (`caps`, read when not given)
        leave, at most `output_cap`. `BudgetRefused` when fewer than `MIN_OUTPUT_TOKENS` would
        be left for the answer."""
        caps = self.budgets(key) if caps is None else caps
        per_in, per_out = price[0] / 1e6, price[1] / 1e6
        for _ in range(3):  # another pod may reserve between the look and the hold
            spent = self.store.counters(key.id + ":spend")
            room = {"output_cap": float(output_cap)}  # output tokens each limit leaves
            if "tokens" in caps:
                room["max_tokens"] = caps["tokens"] - spent.get("tokens", 0) - input_tokens
            if "usd" in caps:
                left = caps["usd"] - spent.get("usd", 0.0) - input_tokens * per_in
                room["max_budget_usd"] = left / per_out if per_out > 0 else (
                    output_cap if left >= 0 else -1.0
                )  # fmt: skip
            binding = min(room, key=room.__getitem__)
            output = int(room[binding])
            if output < MIN_OUTPUT_TOKENS:
                raise _refusal(binding, caps, spent)
            usd = input_tokens * per_in + output * per_out
            tokens = input_tokens + output
            amounts = {"usd": usd, "tokens": tokens}
            if self.store.add(key.id + ":spend", amounts, caps, self.run_ttl_s) is not None:
                return Reservation(usd, tokens, output)
        raise _refusal(binding, caps, self.store.counters(key.id + ":spend"))

    def settle(self, key: RunKey, held: Reservation, model: str, usage: ModelUsage) -> None:
        """Replace the reservation with what the call really cost."""
        tokens = usage.input_tokens + usage.output_tokens
        self.store.add(
            key.id + ":spend",
            {
                "usd": usage.cost_usd - held.usd,
                "tokens": tokens - held.tokens,
                f"{model}\0calls": usage.calls,
                f"{model}\0input_tokens": usage.input_tokens,
                f"{model}\0output_tokens": usage.output_tokens,
                f"{model}\0cost_usd": usage.cost_usd,
            },
            {},
            self.run_ttl_s,
        )

    def release(self, key: RunKey, held: Reservation) -> None:
        """A reserved call that was not made (or failed before it cost anything)."""
        self.store.add(
            key.id + ":spend", {"usd": -held.usd, "tokens": -held.tokens}, {}, self.run_ttl_s
        )

    def spent(self, key: RunKey) -> UsageByModel:
        """What the run has spent, by model."""
        usage: dict[str, dict[str, float]] = {}
        for name, value in self.store.counters(key.id + ":spend").items():
            model, sep, field = name.partition("\0")
            if sep:
                usage.setdefault(model, {})[field] = value
        return {
            model: ModelUsage(
                calls=int(u.get("calls", 0)),
                input_tokens=int(u.get("input_tokens", 0)),
                output_tokens=int(u.get("output_tokens", 0)),
                cost_usd=u.get("cost_usd", 0.0),
            )
            for model, u in usage.items()
        }

    # ------------------------------------------------------------------ children

    def start_child(self, key: RunKey, limit: int) -> None:
        if self.store.add(key.id + ":children", {"live": 1}, {"live": limit}, self.run_ttl_s):
            return
        raise Forbidden(f"child RLM limit reached: at most {limit} at once per run")

    def end_child(self, key: RunKey) -> None:
        self.store.add(key.id + ":children", {"live": -1}, {}, self.run_ttl_s)

    # ------------------------------------------------------------------ log and memo

    def log(self, key: RunKey, nonce: str, entry: dict[str, Any], ttl_s: float) -> None:
        self.store.push(f"{key.id}:log:{nonce}", _dump(entry), ttl_s)

    def take_log(self, key: RunKey, nonce: str) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.store.pop_all(f"{key.id}:log:{nonce}")]

    def remember(self, key: RunKey, call: str, responses: list[str], ttl_s: float) -> None:
        """A sub-call's answers, so a replayed cell gets the same ones (no model called twice);
        kept `ttl_s`, the run's remaining life (`take_prompts` says it), not a day."""
        self.store.push(f"{key.id}:memo:{_digest(call)}", _dump(responses), ttl_s)

    def _lifetime(self, record: dict[str, Any]) -> float:
        return max(1.0, min(self.run_ttl_s, float(record.get("expires", 0)) - time.time()))

    def recall(self, key: RunKey, call: str) -> list[str] | None:
        found = self.store.pop_first(f"{key.id}:memo:{_digest(call)}")
        return None if found is None else json.loads(found)

    # ------------------------------------------------------------------ events

    def claim_event(self, event_key: str, ttl_s: float) -> tuple[str, Any]:
        """("new", None) for the first delivery of an event, ("running", None) while that one
        runs, ("answered", reply) after it answered."""
        key = f"event:{event_key}"
        if self.store.put(key, _dump({"state": "running"}), ttl_s, only_if_absent=True):
            return "new", None
        found = _load(self.store.get(key)) or {}
        if found.get("state") == "answered":
            return "answered", found.get("reply")
        return "running", None

    def answer_event(self, event_key: str, reply: Any, ttl_s: float) -> None:
        self.store.put(f"event:{event_key}", _dump({"state": "answered", "reply": reply}), ttl_s)

    def forget_event(self, event_key: str) -> None:
        """The first delivery failed without an answer: the next one runs again."""
        self.store.delete(f"event:{event_key}")


def _refusal(budget: str, caps: dict[str, float], spent: dict[str, float]) -> BudgetRefused:
    if budget == "max_tokens":
        used, limit = int(spent.get("tokens", 0)), int(caps["tokens"])
        return BudgetRefused(
            f"max_tokens: used {used} of {limit}, too few left for another model call", budget
        )
    usd, limit_usd = spent.get("usd", 0.0), caps.get("usd", 0.0)
    return BudgetRefused(
        f"max_budget_usd: spent ${usd:.4f} of ${limit_usd:g}, too little left for another "
        "model call",
        "max_budget_usd",
    )


def _cell_slot(root: RunKey, run_id: str, replay: bool) -> str:
    return f"{root.id}:cell:{_digest(run_id)[:16]}{':replay' if replay else ''}"


def _dump(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def _load(data: bytes | None) -> Any:
    return None if data is None else json.loads(data)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def event_key(source: str, event_id: str, data: Any, owner: str = ANONYMOUS) -> str:
    """A CloudEvent's identity: its sender (`owner`), its source, its id and its data, however
    encoded (another caller or producer reusing an id, or other data under it, is another
    event)."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    parts = [owner, source, event_id, hashlib.sha256(canonical.encode()).hexdigest()]
    return _digest("\0".join(parts))

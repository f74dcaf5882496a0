"""Persistent conversations: each new question continues the REPL of the earlier ones.

In the guest, turn n sees `context_0` ... `context_n` (`context` is the newest, `context_n`),
and `history_0` ... `history_{n-1}`, each an earlier turn's root conversation as a list of
{"role", "content"} dicts (`history` is the newest). Every other variable carries over.

The state lives in the state blob, addressed by its sha256, so any execute pod serves the next
turn. Per conversation the ledger keeps its owner, the state (ref and data, to re-send it to a
pod that lacks it) and the contexts (likewise); the histories are in the state. So any infer
process continues any conversation of its owner; another caller's id is unknown to it. Each
conversation expires after its last turn and is capped in size.

Each result also carries the conversation's record, signed by infer: a caller may send it back
to continue a conversation the ledger no longer holds (each context with its data). A record
infer did not sign, or signed for another caller, is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from functions.contract import ContextRef, Conversation, StateRef, context_bytes, new_scope
from functions.errors import (
    Conflict,
    NotFound,
    PayloadTooLarge,
    RLMError,
    Unprocessable,
)
from functions.infer.executor import ExecuteError, ReplSession
from functions.infer.ledger import ANONYMOUS, Ledger


class ConversationError(RLMError):
    """The conversation cannot take this turn."""


class ConversationBusy(ConversationError, Conflict):
    pass


class ConversationUnknown(ConversationError, NotFound):
    pass


class ConversationTooLarge(ConversationError, PayloadTooLarge):
    pass


class BadConversation(ConversationError, Unprocessable):
    pass


@dataclass
class Turn:
    """One question of a conversation, as the loop sees it."""

    conversation_id: str
    contexts: list[Any]  # every turn's context, this one's last
    base: StateRef | None  # the state the turn starts from
    refs: list[str] = field(default_factory=list)  # the contexts' sha256 refs, in order
    added_bytes: int = 0  # this turn's context
    state: StateRef | None = None  # the state after the turn, set by `close`
    owner: str = ANONYMOUS
    scope: str = field(default_factory=new_scope)  # its session's owner on the execute plane

    @property
    def index(self) -> int:
        return len(self.contexts) - 1

    @property
    def session_id(self) -> str:
        """With a part only infer can make (the scope's hash): a caller who knows the owner and
        the conversation id still cannot name the session."""
        scoped = hashlib.sha256(self.scope.encode()).hexdigest()[:16]
        return _key(self.owner, self.conversation_id).replace(":", "-") + "-" + scoped

    def note(self) -> str:
        """Added to the first user message of a later turn: what the REPL holds from before."""
        n = self.index
        if n == 0:
            return ""
        earlier = "`context_0`" if n == 1 else f"`context_0` ... `context_{n - 1}`"
        histories = "`history_0`" if n == 1 else f"`history_0` ... `history_{n - 1}`"
        return (
            f"\n\nThis is question {n + 1} of a conversation. The REPL keeps every variable "
            f"from the earlier questions. `context` (also `context_{n}`) is this question's "
            f"context; the earlier ones are {earlier}. {histories} hold the earlier questions' "
            'conversations as lists of {"role", "content"} dicts; `history` is the latest.'
        )

    def close(self, session: ReplSession, history: list[dict[str, str]], traceparent: str | None):
        """Bind this turn's history in the REPL, reset `answer`, and keep the state with data."""
        variables = {
            f"history_{self.index}": history,
            "history": history,
            "answer": {"content": None, "ready": False},
        }
        try:
            response = session.run("pass", traceparent, variables, return_state=True)
        except ExecuteError:
            return
        if response.error is None and session.state_ref and session.state_data is not None:
            self.state = StateRef(ref=session.state_ref, data=session.state_data)


class ConversationStore:
    """Conversations in the ledger: by owner, bounded by age and size, one turn at a time."""

    def __init__(
        self, ledger: Ledger, signing_key: bytes, ttl_s: float, max_bytes: int, turn_s: float
    ) -> None:
        self.ledger = ledger
        self.store = ledger.store
        self.signing_key = signing_key
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.turn_s = turn_s  # how long a turn may hold its conversation

    def begin(
        self, owner: str, conversation_id: str | None, context: Any, carried: Conversation | None
    ) -> Turn:
        """The next turn of `owner`'s conversation (a new one without an id). Refuses a turn
        while another runs (409), an unknown or expired id (404), one over its size (413)."""
        data = context_bytes(context)
        ref, added = hashlib.sha256(data).hexdigest(), len(data)
        if conversation_id is None:
            conversation_id = uuid.uuid4().hex
            record: dict[str, Any] = {"refs": [], "state": None, "bytes": 0, "scope": new_scope()}
            self.store.put(_key(owner, conversation_id), _dump(record), self.ttl_s)
        else:
            record = self._load(owner, conversation_id)
            if record is None and carried is not None and carried.id == conversation_id:
                record = self._adopt(owner, carried)
            if record is None:
                raise self._gone(owner, conversation_id)
        key = _key(owner, conversation_id)
        state = record.get("state")
        size = record["bytes"] + len(state.get("data") or "" if state else "")
        if size + added > self.max_bytes:
            raise ConversationTooLarge(self._too_large(conversation_id))
        if not self.store.put(key + ":busy", b"1", self.turn_s, only_if_absent=True):
            raise ConversationBusy(
                f"conversation {conversation_id} has a turn running; wait for its result"
            )
        contexts = [self._context(key, r, conversation_id) for r in record["refs"]]
        return Turn(
            conversation_id,
            [*contexts, context],
            StateRef(**state) if state else None,
            [*record["refs"], ref],
            added,
            owner=owner,
            scope=record.get("scope") or new_scope(),
        )

    def end(self, turn: Turn) -> Conversation | None:
        """Keep what the turn left (when it left a state) and start the expiry clock again.
        Returns the signed record a caller keeps to continue elsewhere (None if dropped)."""
        key = _key(turn.owner, turn.conversation_id)
        try:
            record = self._load(turn.owner, turn.conversation_id) or {
                "refs": [], "state": None, "bytes": 0,
            }  # fmt: skip
            if turn.state is not None:
                new = turn.refs[len(record["refs"]) :]
                for ref, value in zip(new, turn.contexts[len(record["refs"]) :], strict=True):
                    self.store.put(f"{key}:ctx:{ref}", _dump(value), self.ttl_s)
                record = {"refs": turn.refs, "state": turn.state.model_dump(),
                          "bytes": record["bytes"] + turn.added_bytes,
                          "scope": turn.scope}  # fmt: skip
            size = record["bytes"] + len((record["state"] or {}).get("data") or "")
            if size > self.max_bytes:
                self._drop(key, self._too_large(turn.conversation_id))
                return None
            self.store.put(key, _dump(record), self.ttl_s)
            for ref in record["refs"]:  # the contexts live as long as the conversation
                found = self.store.get(f"{key}:ctx:{ref}")
                if found is not None:
                    self.store.put(f"{key}:ctx:{ref}", found, self.ttl_s)
        finally:
            self.store.delete(key + ":busy")
        state = StateRef(**record["state"]) if record["state"] else None
        contexts = [ContextRef(ref=ref) for ref in record["refs"]]
        return Conversation(
            id=turn.conversation_id,
            state=state,
            contexts=contexts,
            signature=self._sign(turn.owner, turn.conversation_id, state, contexts),
        )

    # ----------------------------------------------------------------- pieces

    def _load(self, owner: str, conversation_id: str) -> dict[str, Any] | None:
        found = self.store.get(_key(owner, conversation_id))
        return None if found is None else json.loads(found)

    def _context(self, key: str, ref: str, conversation_id: str) -> Any:
        found = self.store.get(f"{key}:ctx:{ref}")
        if found is None:
            raise ConversationUnknown(
                f"conversation {conversation_id} lost a context (expired); start a new one"
            )
        return json.loads(found)

    def _adopt(self, owner: str, carried: Conversation) -> dict[str, Any]:
        """A conversation the ledger no longer holds, from the record its caller kept."""
        expected = self._sign(owner, carried.id, carried.state, carried.contexts)
        if not hmac.compare_digest(carried.signature or "", expected):
            raise BadConversation(
                "conversation: not a record this deployment signed for you (send the "
                "`conversation` of your last result as it came)"
            )
        key = _key(owner, carried.id)
        size = 0
        for index, held in enumerate(carried.contexts):
            if held.data is None:
                raise BadConversation(
                    f"conversation.contexts[{index}] has no data: send each context's data"
                )
            data = context_bytes(held.data)
            if hashlib.sha256(data).hexdigest() != held.ref:
                raise BadConversation(f"conversation.contexts[{index}].data does not match its ref")
            self.store.put(f"{key}:ctx:{held.ref}", _dump(held.data), self.ttl_s)
            size += len(data)
        state = carried.state.model_dump() if carried.state else None
        return {"refs": [c.ref for c in carried.contexts], "state": state, "bytes": size,
                "scope": new_scope()}  # fmt: skip

    def _sign(
        self,
        owner: str,
        conversation_id: str,
        state: StateRef | None,
        contexts: list[ContextRef],
    ) -> str:
        """The signature of a record: its owner, id, state ref and context refs (the data of
        each is checked against its ref)."""
        claims = [owner, conversation_id, state.ref if state else "", *[c.ref for c in contexts]]
        message = "\0".join(claims).encode()
        return hmac.new(self.signing_key, message, hashlib.sha256).hexdigest()

    def _drop(self, key: str, why: str) -> None:
        self.store.delete(key)
        self.store.put(key + ":gone", why.encode(), _TOMBSTONE_S)

    def _gone(self, owner: str, conversation_id: str) -> ConversationError:
        why = self.store.get(_key(owner, conversation_id) + ":gone")
        if why is not None:
            return ConversationTooLarge(why.decode())
        return ConversationUnknown(
            f"conversation {conversation_id} expired or unknown: a conversation lasts "
            f"{self.ttl_s:g} s after its last turn (INFER_CONVERSATION_TTL); send `conversation` "
            "from its last result (each context with its data) to continue it, or start a new "
            "one with persistent: true",
        )

    def _too_large(self, conversation_id: str) -> str:
        return (
            f"conversation {conversation_id} exceeds {self.max_bytes} bytes of state and contexts "
            "(INFER_CONVERSATION_MAX_MB); start a new one with persistent: true"
        )


_TOMBSTONE_S = 24 * 3600.0  # how long a dropped conversation's id still says why


def _key(owner: str, conversation_id: str) -> str:
    return "conv:" + hashlib.sha256(f"{owner}\0{conversation_id}".encode()).hexdigest()[:32]


def _dump(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()

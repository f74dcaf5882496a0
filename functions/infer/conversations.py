"""Persistent conversations: each new question continues the REPL of the earlier ones.

In the guest, turn n sees `context_0` ... `context_n` (`context` is the newest, `context_n`),
and `history_0` ... `history_{n-1}`, each an earlier turn's root conversation as a list of
{"role", "content"} dicts (`history` is the newest). Every other variable carries over.

The state lives in the state blob, addressed by its sha256, so any execute pod serves the next
turn. Per conversation, this infer process keeps only the state (ref and data, to re-send it
to a pod that lacks it) and the contexts (to re-send them likewise); the histories are in the
state. The store is bounded: an expiry after the last turn, a size cap per conversation and a
cap on the number of conversations. It is per process: a turn that reaches another infer
process gets a 404, unless it carries the conversation's record from its last result (the
state, and each context with its data), from which any infer process continues it.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from functions.contract import ContextRef, Conversation, StateRef, context_bytes, new_scope
from functions.errors import (
    Conflict,
    NotFound,
    PayloadTooLarge,
    RLMError,
    TooManyRequests,
    Unprocessable,
)
from functions.infer.executor import ExecuteError, ReplSession

_TOMBSTONES = 4096  # ids remembered after they go, to say why


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


class TooManyConversations(ConversationError, TooManyRequests):
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
    scope: str = field(default_factory=new_scope)  # its session's owner on the execute plane

    @property
    def index(self) -> int:
        return len(self.contexts) - 1

    @property
    def session_id(self) -> str:
        """The conversation's session, with a part only this process can make (the scope's
        hash): a caller who knows or chooses the conversation id cannot name it."""
        return f"conv-{self.conversation_id}-{hashlib.sha256(self.scope.encode()).hexdigest()[:16]}"

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


@dataclass
class _Conversation:
    id: str
    contexts: list[Any] = field(default_factory=list)
    refs: list[str] = field(default_factory=list)  # the contexts' sha256 refs
    context_bytes: int = 0
    state: StateRef | None = None
    expires: float = 0.0
    busy: bool = False
    scope: str = field(default_factory=new_scope)  # never in the record a caller keeps

    @property
    def size(self) -> int:
        return self.context_bytes + (len(self.state.data or "") if self.state else 0)


class ConversationStore:
    """This process's conversations: thread-safe, bounded by age, size and count."""

    def __init__(
        self,
        ttl_s: float,
        max_bytes: int,
        max_conversations: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s, self.max_bytes, self.max_conversations = ttl_s, max_bytes, max_conversations
        self._clock = clock
        self._items: OrderedDict[str, _Conversation] = OrderedDict()
        self._gone: OrderedDict[str, ConversationError] = OrderedDict()
        self._lock = threading.Lock()

    def begin(
        self, conversation_id: str | None, context: Any, carried: Conversation | None = None
    ) -> Turn:
        """A new turn: of a new conversation when `conversation_id` is None; of `carried` when
        this process does not hold `conversation_id`. Raises `ConversationError`: 404 unknown or
        expired, 409 a turn running, 413 over the size cap, 422 a carried record that does not
        hold together, 429 every slot holds a running conversation."""
        data = context_bytes(context)
        added, ref = len(data), hashlib.sha256(data).hexdigest()
        with self._lock:
            self._expire()
            if conversation_id is None:
                conversation = self._new()
            elif conversation_id in self._items:
                conversation = self._items[conversation_id]
            elif carried is not None and carried.id == conversation_id:
                conversation = self._adopt(carried)
            else:
                self._unknown(conversation_id)
            if conversation.busy:
                raise ConversationBusy(
                    f"conversation {conversation.id} has a turn running; wait for its result"
                )
            if conversation.size + added > self.max_bytes:
                raise ConversationTooLarge(self._too_large(conversation.id))
            conversation.busy = True
            self._items.move_to_end(conversation.id)
            return Turn(conversation.id, [*conversation.contexts, context], conversation.state,
                        [*conversation.refs, ref], added, scope=conversation.scope)  # fmt: skip

    def end(self, turn: Turn) -> Conversation | None:
        """Keep what the turn left (when it left a state), and start the expiry clock again.
        Returns the record a caller keeps to continue elsewhere (None if it was dropped)."""
        with self._lock:
            conversation = self._items.get(turn.conversation_id)
            if conversation is None:
                return None
            conversation.busy = False
            conversation.expires = self._clock() + self.ttl_s
            if turn.state is not None:
                conversation.contexts = turn.contexts
                conversation.refs = turn.refs
                conversation.context_bytes += turn.added_bytes
                conversation.state = turn.state
            if conversation.size > self.max_bytes:
                too_large = ConversationTooLarge(self._too_large(conversation.id))
                self._drop(conversation.id, too_large)
                return None
            return Conversation(
                id=conversation.id,
                state=conversation.state,
                contexts=[ContextRef(ref=ref) for ref in conversation.refs],
            )

    def __len__(self) -> int:
        return len(self._items)

    # ----------------------------------------------------------------- pieces

    def _new(self) -> _Conversation:
        while len(self._items) >= self.max_conversations:
            self._evict_one()
        conversation = _Conversation(id=uuid.uuid4().hex, expires=self._clock() + self.ttl_s)
        self._items[conversation.id] = conversation
        return conversation

    def _adopt(self, carried: Conversation) -> _Conversation:
        """A conversation another process served, from the record its caller kept."""
        contexts, size = [], 0
        for index, held in enumerate(carried.contexts):
            if held.data is None:
                raise BadConversation(
                    f"conversation.contexts[{index}] has no data: send each context's data"
                )
            data = context_bytes(held.data)
            if hashlib.sha256(data).hexdigest() != held.ref:
                raise BadConversation(f"conversation.contexts[{index}].data does not match its ref")
            contexts.append(held.data)
            size += len(data)
        while len(self._items) >= self.max_conversations:
            self._evict_one()
        conversation = _Conversation(
            id=carried.id,
            contexts=contexts,
            refs=[held.ref for held in carried.contexts],
            context_bytes=size,
            state=carried.state,
            expires=self._clock() + self.ttl_s,
        )
        self._items[conversation.id] = conversation
        self._gone.pop(conversation.id, None)
        return conversation

    def _unknown(self, conversation_id: str) -> NoReturn:
        raise self._gone.get(conversation_id) or self._expired(conversation_id)

    def _evict_one(self) -> None:
        idle = next((c for c in self._items.values() if not c.busy), None)
        if idle is None:
            raise TooManyConversations(
                f"this infer process holds {self.max_conversations} conversations, all "
                "running a turn (INFER_MAX_CONVERSATIONS); retry shortly",
            )  # fmt: skip
        self._drop(idle.id, self._expired(idle.id))

    def _expire(self) -> None:
        now = self._clock()
        for conversation in list(self._items.values()):
            if not conversation.busy and conversation.expires <= now:
                self._drop(conversation.id, self._expired(conversation.id))

    def _drop(self, conversation_id: str, why: ConversationError) -> None:
        self._items.pop(conversation_id, None)
        self._gone[conversation_id] = why
        while len(self._gone) > _TOMBSTONES:
            self._gone.popitem(last=False)

    def _expired(self, conversation_id: str) -> ConversationError:
        return ConversationUnknown(
            f"conversation {conversation_id} expired or unknown: a conversation lasts "
            f"{self.ttl_s:g} s after its last turn (INFER_CONVERSATION_TTL), on the infer process "
            "that served it; send `conversation` from its last result (each context with its "
            "data) to continue it here, or start a new one with persistent: true",
        )

    def _too_large(self, conversation_id: str) -> str:
        return (
            f"conversation {conversation_id} exceeds {self.max_bytes} bytes of state and contexts "
            "(INFER_CONVERSATION_MAX_MB); start a new one with persistent: true"
        )

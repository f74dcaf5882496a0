"""At most one run per CloudEvent id in this process: a redelivery gets the first result.

The Broker redelivers on timeouts and errors. While the first delivery still runs, a second
one waits for it; once it has finished, its result is kept (bounded LRU) for later ones. A
process that dies loses the table, and a redelivery to a fresh process runs once more.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class OncePerKey(Generic[T]):
    def __init__(self, keep: int = 4096) -> None:
        self._done: OrderedDict[str, T] = OrderedDict()
        self._running: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._keep = keep

    def run(self, key: str, work: Callable[[], T]) -> tuple[T, bool]:
        """The result for `key` and whether it was a repeat (served without running again)."""
        while True:
            with self._lock:
                if key in self._done:
                    self._done.move_to_end(key)
                    return self._done[key], True
                waiting = self._running.get(key)
                if waiting is None:
                    self._running[key] = threading.Event()
                    break
            waiting.wait()
        try:
            result = work()
        except BaseException:
            with self._lock:
                self._running.pop(key).set()
            raise
        with self._lock:
            self._done[key] = result
            while len(self._done) > self._keep:
                self._done.popitem(last=False)
            self._running.pop(key).set()
        return result, False

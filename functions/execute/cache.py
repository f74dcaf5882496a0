"""Pod-local caches, bounded by bytes: blobs by (scope, sha256), live sessions by (scope, id).

Both are the fast path only. Losing an entry is always safe: the caller re-sends data on a
409, or rebuilds the session from its state blob.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LRU(Generic[V]):
    """A thread-safe LRU map bounded by total size and count; evicted values go to `on_evict`."""

    def __init__(
        self,
        max_bytes: int,
        max_items: int = 1 << 30,
        on_evict: Callable[[Hashable, V], None] | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_items = max_items
        self._on_evict = on_evict
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: V, size: int) -> None:
        """Keep `value`; entries larger than the whole bound are not kept."""
        evicted: list[tuple[Hashable, V]] = []
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
                if old[0] is not value:
                    evicted.append((key, old[0]))
            if size <= self.max_bytes:
                self._items[key] = (value, size)
                self._bytes += size
            else:
                evicted.append((key, value))
            while self._items and (
                self._bytes > self.max_bytes or len(self._items) > self.max_items
            ):
                k, (v, s) = self._items.popitem(last=False)
                self._bytes -= s
                evicted.append((k, v))
        self._evict(evicted)

    def pop(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return None
            self._bytes -= item[1]
            return item[0]

    def clear(self) -> None:
        with self._lock:
            evicted = [(k, v) for k, (v, _) in self._items.items()]
            self._items.clear()
            self._bytes = 0
        self._evict(evicted)

    def _evict(self, evicted: list[tuple[Hashable, V]]) -> None:
        if self._on_evict:
            for key, value in evicted:
                self._on_evict(key, value)

    def __len__(self) -> int:
        return len(self._items)

"""Bounded in-process caches. Every cache keyed by publisher or credential uses one of these, so
rotated credentials and departed publishers cannot accumulate in a long-running process."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

#: Default bound: far above the publishers one process serves, small enough to be nothing in memory.
DEFAULT_MAX_ENTRIES = 4096


class LruCache(Generic[K, V]):
    """A thread-safe mapping that forgets its least recently used entry beyond ``max_entries``."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._max = max_entries
        self._lock = threading.Lock()
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def get_or_create(self, key: K, create: Callable[[], V]) -> V:
        """The entry for ``key``, made by ``create`` (under the cache's lock) when missing."""
        with self._lock:
            value = self._items.get(key)
            if value is None:
                value = create()
                self._items[key] = value
                while len(self._items) > self._max:
                    self._items.popitem(last=False)
            else:
                self._items.move_to_end(key)
            return value

    def pop(self, key: K) -> None:
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class TtlCache(Generic[K, V]):
    """A small thread-safe cache whose entries expire (``ttl`` may differ per entry) and whose size is
    bounded (the entry closest to expiry goes first)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._clock = clock
        self._max = max_entries
        self._lock = threading.Lock()
        self._items: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None or item[0] <= self._clock():
                self._items.pop(key, None)
                return None
            return item[1]

    def put(self, key: K, value: V, ttl: float) -> None:
        with self._lock:
            now = self._clock()
            self._items[key] = (now + ttl, value)
            if len(self._items) > self._max:
                live = {k: v for k, v in self._items.items() if v[0] > now}
                for k in sorted(live, key=lambda k: live[k][0])[: max(0, len(live) - self._max)]:
                    del live[k]
                self._items = live

    def pop(self, key: K) -> None:
        with self._lock:
            self._items.pop(key, None)

    def pop_where(self, predicate: Callable[[K], bool]) -> None:
        with self._lock:
            for key in [k for k in self._items if predicate(k)]:
                del self._items[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class KeyedLocks(Generic[K]):
    """One lock per key, for "one at a time per publisher"; idle locks are dropped beyond the bound."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._max = max_entries
        self._lock = threading.Lock()
        self._locks: dict[K, threading.Lock] = {}

    def lock(self, key: K) -> threading.Lock:
        with self._lock:
            found = self._locks.get(key)
            if found is None:
                if len(self._locks) >= self._max:
                    # Only unheld locks go: a holder and its waiters keep sharing the same one.
                    self._locks = {k: v for k, v in self._locks.items() if v.locked()}
                found = self._locks[key] = threading.Lock()
            return found

    def __len__(self) -> int:
        with self._lock:
            return len(self._locks)

"""The in-process store: the embedded default, bounded and least-recently-used."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed


class MemoryStore:
    """A dict with expiry and an entry limit; answers at once."""

    def __init__(self, max_entries: int = 20480, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries <= 0:
            raise ValueError("a memory store needs room for at least one entry")
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Deferred[bytes | None]:
        entry = self._entries.get(key)
        if entry is None:
            return succeed(None)
        expires, value = entry
        if expires <= self._clock():
            del self._entries[key]
            return succeed(None)
        self._entries.move_to_end(key)
        return succeed(value)

    def set(self, key: bytes, value: bytes, ttl: int) -> Deferred[None]:
        if ttl > 0:
            self._entries[key] = (self._clock() + ttl, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return succeed(None)

    def add(self, key: bytes, value: bytes, ttl: int) -> Deferred[bool]:
        entry = self._entries.get(key)
        if entry is not None and entry[0] > self._clock():
            return succeed(False)
        self.set(key, value, ttl)
        return succeed(True)

    def delete(self, key: bytes) -> Deferred[None]:
        self._entries.pop(key, None)
        return succeed(None)

    def expire(self) -> int:
        """Drop expired entries; the reactor's flush calls this."""
        now = self._clock()
        stale = [key for key, (expires, _) in self._entries.items() if expires <= now]
        for key in stale:
            del self._entries[key]
        return len(stale)

    def close(self) -> Deferred[None]:
        self._entries.clear()
        return succeed(None)

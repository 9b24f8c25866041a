"""The in-process store: the embedded default, bounded and least-recently-used."""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from twisted_sesscache.interfaces import IExpiringStore


@implementer(IExpiringStore)
class MemoryStore:
    """A dict with expiry and an entry limit; answers at once."""

    shared = False  # records never leave the process: a random sealing key will do
    keeps_deadlines = False  # answers at once
    answers_at_once = True  # every Deferred it returns has fired: OpenSSL's callback may ask it directly

    def __init__(self, max_entries: int = 20480, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries <= 0:
            raise ValueError("a memory store needs room for at least one entry")
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()
        # (expiry, key), oldest first; stale pairs (key since replaced or gone) are skipped.
        self._expiries: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, timeout: float | None = None) -> Deferred[bytes | None]:
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
            expires = self._clock() + ttl
            self._entries[key] = (expires, value)
            self._entries.move_to_end(key)
            heapq.heappush(self._expiries, (expires, key))
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return succeed(None)

    def add(self, key: bytes, value: bytes, ttl: int) -> Deferred[bool]:
        entry = self._entries.get(key)
        if entry is not None and entry[0] > self._clock():
            return succeed(False)
        self.set(key, value, ttl)
        return succeed(True)

    def take(self, key: bytes, timeout: float | None = None) -> Deferred[bytes | None]:
        entry = self._entries.pop(key, None)
        return succeed(entry[1] if entry is not None and entry[0] > self._clock() else None)

    def delete(self, key: bytes) -> Deferred[None]:
        self._entries.pop(key, None)
        return succeed(None)

    def stats(self) -> dict[str, int]:
        return {"store_errors": 0, "store_entries": len(self._entries)}

    def expire(self, budget: int | None = None) -> int:
        """Drop expired entries, oldest first, at most ``budget`` of them; returns how many went.

        Costs in proportion to what expired, not to the store's size.
        """
        now, removed = self._clock(), 0
        while self._expiries and self._expiries[0][0] <= now and (budget is None or removed < budget):
            expires, key = heapq.heappop(self._expiries)
            entry = self._entries.get(key)
            if entry is not None and entry[0] == expires:
                del self._entries[key]
                removed += 1
        if len(self._expiries) > 2 * len(self._entries) + 64:
            # Replaced and deleted keys left stale pairs behind: rebuild.
            self._expiries = [(expires, key) for key, (expires, _) in self._entries.items()]
            heapq.heapify(self._expiries)
        return removed

    def close(self) -> Deferred[None]:
        self._entries.clear()
        self._expiries.clear()
        return succeed(None)

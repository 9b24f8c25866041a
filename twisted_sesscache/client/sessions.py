"""The client side's own bookkeeping: sessions per key, least-recently-used, single-use for TLS 1.3."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

DEFAULT_CLIENT_SIZE = 1024
DEFAULT_PER_KEY = 2


@dataclass
class Entry:
    der: bytes
    tls13: bool
    expires: float


class ClientSessions:
    """Sessions per key, newest last, keys in least-recently-used order.

    A TLS 1.3 entry leaves when it is taken; a TLS 1.2 entry stays until a newer
    TLS 1.2 session for its key replaces it, it expires, or it is evicted.
    """

    def __init__(self, size: int = DEFAULT_CLIENT_SIZE, per_key: int = DEFAULT_PER_KEY) -> None:
        if size < 1 or per_key < 1:
            raise ValueError(f"size and per_key must be at least 1, not {size} and {per_key}")
        self.size = size
        self.per_key = per_key
        self.evicted = 0
        self.expired = 0
        self._keys: OrderedDict[Hashable, list[Entry]] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def put(self, key: Hashable, entry: Entry) -> None:
        entries = self._keys.setdefault(key, [])
        self._keys.move_to_end(key)
        before = len(entries)
        if not entry.tls13:
            entries[:] = [e for e in entries if e.tls13]
        entries[:] = [e for e in entries if e.der != entry.der]
        entries.append(entry)
        del entries[: max(0, len(entries) - self.per_key)]
        self._count += len(entries) - before
        while self._count > self.size:
            oldest_key, oldest = next(iter(self._keys.items()))
            oldest.pop(0)
            self._count -= 1
            self.evicted += 1
            if not oldest:
                del self._keys[oldest_key]

    def take(self, key: Hashable, now: float) -> Entry | None:
        """The newest live entry for ``key``; a TLS 1.3 one is removed (single use)."""
        entries = self._keys.get(key)
        if not entries:
            return None
        self._drop_expired(key, entries, now)
        if not entries:
            return None
        entry = entries[-1]
        if entry.tls13:
            entries.pop()
            self._count -= 1
        if entries:
            self._keys.move_to_end(key)
        else:
            del self._keys[key]
        return entry

    def forget(self, key: Hashable, ders: Iterable[bytes]) -> int:
        entries = self._keys.get(key)
        if not entries:
            return 0
        doomed = set(ders)
        kept = [e for e in entries if e.der not in doomed]
        removed = len(entries) - len(kept)
        self._count -= removed
        if kept:
            entries[:] = kept
        else:
            del self._keys[key]
        return removed

    def flush(self, now: float) -> int:
        """Remove every entry expired at ``now``; returns how many went."""
        removed = 0
        for key, entries in list(self._keys.items()):
            removed += self._drop_expired(key, entries, now)
            if not entries:
                del self._keys[key]
        return removed

    def _drop_expired(self, key: Hashable, entries: list[Entry], now: float) -> int:
        live = [e for e in entries if e.expires > now]
        removed = len(entries) - len(live)
        if removed:
            entries[:] = live
            self._count -= removed
            self.expired += removed
        return removed

    def clear(self) -> None:
        self._keys.clear()
        self._count = 0

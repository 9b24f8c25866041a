"""Client sessions shared through the store, so a fleet of clients (proxies) shares its upstream sessions.

Written through when learned, fetched when this process holds none for the
key: the connection's ClientHello waits for the answer, at most the store
timeout, and goes out without a session if none comes. A TLS 1.3 ticket is
single-use, so fetching one deletes it from the store.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet.defer import Deferred

from twisted_sesscache.sealing import Sealer
from twisted_sesscache.interfaces import ISessionStore
from twisted_sesscache.stores.sealed import SealedRecords

KIND = b"client-session"
_TLS13, _TLS12 = b"\x13", b"\x12"


class SharedClientSessions:
    """The store side of the client cache: publish what was learned, fetch what is missing."""

    def __init__(self, store: ISessionStore, sealer: Sealer, *, timeout: float = 0.05, reactor: Any = None) -> None:
        self.records = SealedRecords(store, sealer, KIND, timeout=timeout, reactor=reactor)

    @property
    def counts(self) -> dict[str, int]:
        return self.records.counts

    @staticmethod
    def store_key(key: object) -> tuple[bytes, bytes]:
        """The record's name in the store, and the sealing context that binds it to ``key``."""
        context = hashlib.sha256(repr(key).encode("utf-8", "backslashreplace")).digest()
        return b"client:" + context.hex()[:32].encode(), context

    def publish(self, key: object, der: bytes, *, tls13: bool, ttl: int) -> None:
        name, context = self.store_key(key)
        self.records.put(name, (_TLS13 if tls13 else _TLS12) + der, context, ttl)

    def fetch(self, key: object) -> Deferred[tuple[bytes, bool] | None]:
        """``(der, tls13)`` from the store, or None; never fails, never waits past the timeout."""
        name, context = self.store_key(key)

        def found(plain: bytes | None) -> tuple[bytes, bool] | None:
            if plain is None:
                return None
            tls13 = plain[:1] == _TLS13
            if tls13:
                self.records.delete(name)  # a ticket is offered once
            return plain[1:], tls13

        return self.records.fetch(name, context).addCallback(found)

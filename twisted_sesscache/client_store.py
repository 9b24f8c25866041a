"""Client sessions shared through the store, so a fleet of clients (proxies) shares its upstream sessions.

Written through when learned, fetched when this process holds none for the
key: the connection's ClientHello waits for the answer, at most the store
timeout, and goes out without a session if none comes. A TLS 1.3 ticket is
single-use, so fetching one deletes it from the store.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.logger import Logger

from twisted_sesscache.sealing import SealError, Sealer
from twisted_sesscache.stores import SessionStore

KIND = b"client-session"
_TLS13, _TLS12 = b"\x13", b"\x12"


class SharedClientSessions:
    """The store side of the client cache: publish what was learned, fetch what is missing."""

    log = Logger()

    def __init__(self, store: SessionStore, sealer: Sealer, *, timeout: float = 0.05, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.store = store
        self.sealer = sealer
        self.timeout = timeout
        self._reactor = reactor
        self.counts = {"store_hits": 0, "store_misses": 0, "store_timeouts": 0, "store_rejected": 0, "store_writes": 0}

    @staticmethod
    def store_key(key: object) -> tuple[bytes, bytes]:
        """The record's name in the store, and the sealing context that binds it to ``key``."""
        context = hashlib.sha256(repr(key).encode("utf-8", "backslashreplace")).digest()
        return b"client:" + context.hex()[:32].encode(), context

    def publish(self, key: object, der: bytes, *, tls13: bool, ttl: int) -> None:
        if ttl <= 0:
            return
        name, context = self.store_key(key)
        record = self.sealer.seal((_TLS13 if tls13 else _TLS12) + der, kind=KIND, context=context)
        self.counts["store_writes"] += 1
        self.store.set(name, record, ttl).addErrback(lambda _: None)  # counted by the store

    def fetch(self, key: object) -> Deferred[tuple[bytes, bool] | None]:
        """``(der, tls13)`` from the store, or None; never fails, never waits past the timeout."""
        name, context = self.store_key(key)

        def found(record: bytes | None) -> tuple[bytes, bool] | None:
            if record is None:
                self.counts["store_misses"] += 1
                return None
            try:
                plain = self.sealer.open(record, kind=KIND, context=context)
            except SealError:
                self.counts["store_rejected"] += 1
                return None
            tls13 = plain[:1] == _TLS13
            if tls13:
                self.store.delete(name).addErrback(lambda _: None)  # a ticket is offered once
            self.counts["store_hits"] += 1
            return plain[1:], tls13

        def failed(failure: Any) -> None:
            self.counts["store_timeouts" if failure.check(TimeoutError) else "store_misses"] += 1
            return None

        lookup = self.store.get(name)
        lookup.addTimeout(self.timeout, self._reactor)
        return lookup.addCallbacks(found, failed)

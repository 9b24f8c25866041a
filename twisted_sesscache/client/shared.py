"""Client sessions shared through the store, so a fleet of clients (proxies) shares its upstream sessions.

Written through when learned, fetched when this process holds none for the
key: the connection's ClientHello waits for the answer, at most the store
timeout, and goes out without a session if none comes.

Each key has two records: its newest TLS 1.3 ticket and its newest TLS 1.2
session. A ticket is single-use (RFC 8446, appendix C.4), so it is *taken*
(``ISessionStore.take``, Redis ``GETDEL``): of two processes asking at once,
exactly one gets it. Which record is a ticket must be known before it is
read, hence the two names; a fetch takes the ticket first and reads the TLS
1.2 session only when there is none. After a server goes back from TLS 1.3
to 1.2, its last ticket is offered once more (one full handshake) before the
TLS 1.2 session is used.
"""

from __future__ import annotations

import hashlib
from typing import cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from twisted_sesscache.interfaces import ISessionStore
from twisted_sesscache.sealing import Sealer
from twisted_sesscache.stores.sealed import SealedRecords

KIND = b"client-session"
_TLS13, _TLS12 = b"\x13", b"\x12"
_TICKET, _SESSION = b":tls1.3", b":tls1.2"


class SharedClientSessions:
    """The store side of the client cache: publish what was learned, fetch what is missing.

    ``clock`` is the reactor whose time bounds each fetch (None: the global
    reactor, imported when first needed).
    """

    def __init__(
        self, store: ISessionStore, sealer: Sealer, *, timeout: float, clock: IReactorTime | None = None
    ) -> None:
        self.records = SealedRecords(_TicketFirst(store), sealer, KIND, timeout=timeout, reactor=clock)

    @property
    def counts(self) -> dict[str, int]:
        return self.records.counts

    @staticmethod
    def store_key(key: object) -> tuple[bytes, bytes]:
        """The records' base name in the store, and the sealing context that binds them to ``key``."""
        context = hashlib.sha256(repr(key).encode("utf-8", "backslashreplace")).digest()
        return b"client:" + context.hex()[:32].encode(), context

    def publish(self, key: object, der: bytes, *, tls13: bool, ttl: int) -> None:
        """Write ``der`` as the key's newest ticket (TLS 1.3) or session (TLS 1.2); never waited on."""
        base, context = self.store_key(key)
        name = base + (_TICKET if tls13 else _SESSION)
        self.records.put(name, (_TLS13 if tls13 else _TLS12) + der, context, ttl)

    def fetch(self, key: object) -> Deferred[tuple[bytes, bool] | None]:
        """``(der, tls13)`` from the store, or None; never fails, never waits past the timeout.

        One lookup as the store's counters see it (a hit, a miss, a timeout or
        a rejection), whether it needed one store call or two.
        """
        base, context = self.store_key(key)

        def found(plain: bytes | None) -> tuple[bytes, bool] | None:
            if plain is None:
                return None
            return plain[1:], plain[:1] == _TLS13

        return self.records.fetch(base, context).addCallback(found)


@implementer(ISessionStore)
class _TicketFirst:
    """The store as the client side reads it: ``get(base)`` takes the ticket, else gets the session.

    Everything else is the store's own call. A view rather than two fetches,
    so that one lookup has one deadline and counts once. Records are written
    under the full names (``base:tls1.3``, ``base:tls1.2``) and read under the
    base name: sealing binds the key's context and the record's kind byte, not
    the store name (should SealedRecords bind names, this view must pass the
    full one it read).
    """

    def __init__(self, store: ISessionStore) -> None:
        self.store = store
        self.shared = store.shared

    def get(self, key: bytes) -> Deferred[bytes | None]:
        session = key + _SESSION
        ticket = cast("Deferred[bytes | None]", self.store.take(key + _TICKET))

        def or_session(record: bytes | None) -> bytes | None | Deferred[bytes | None]:
            if record is not None:
                return record
            return cast("Deferred[bytes | None]", self.store.get(session))

        # A chained Deferred: cancelling the lookup (its deadline) cancels whichever call is waiting.
        return cast("Deferred[bytes | None]", ticket.addCallback(or_session))

    def take(self, key: bytes) -> object:
        return self.store.take(key)

    def set(self, key: bytes, value: bytes, ttl: int) -> object:
        return self.store.set(key, value, ttl)

    def add(self, key: bytes, value: bytes, ttl: int) -> object:
        return self.store.add(key, value, ttl)

    def delete(self, key: bytes) -> object:
        return self.store.delete(key)

    def stats(self) -> dict[str, int]:
        return self.store.stats()

    def close(self) -> object:
        return self.store.close()

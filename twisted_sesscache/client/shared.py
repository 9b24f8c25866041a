"""Client sessions shared through the store, so a fleet of clients (proxies) shares its upstream sessions.

Written through when learned, fetched when this process holds none for the
key: the connection's ClientHello waits for the answer, at most the store
timeout, and goes out without a session if none comes.

Each key has two records: its newest TLS 1.3 ticket and its newest TLS 1.2
session. A ticket is single-use (RFC 8446, appendix C.4), so it is *taken*
(``ISessionStore.take``, Redis ``GETDEL``): of two processes asking at once,
exactly one gets it. Which record is a ticket must be known before it is
read, hence the two names; a fetch takes the ticket first and reads the TLS
1.2 session only when there is none, as one lookup with one deadline. Each
record is sealed under the name it lives at, so a ticket moved into the
session's place does not open. After a server goes back from TLS 1.3
to 1.2, its last ticket is offered once more (one full handshake) before the
TLS 1.2 session is used.
"""

from __future__ import annotations

import hashlib
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from twisted_sesscache.interfaces import ISessionStore
from twisted_sesscache.sealing import RecordSealer
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
        self, store: ISessionStore, sealer: RecordSealer, *, timeout: float, clock: IReactorTime | None = None
    ) -> None:
        self.records = SealedRecords(store, sealer, KIND, timeout=timeout, reactor=clock)

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
        # The ticket is taken, so of two processes asking at once only one offers it.
        names = [(base + _TICKET, True), (base + _SESSION, False)]
        return self.records.fetch_first(names, context, _unpack)


def _unpack(plain: bytes) -> tuple[bytes, bool]:
    """A record's DER and whether it is a TLS 1.3 ticket (its first byte)."""
    return plain[1:], plain[:1] == _TLS13

"""OpenSSL's external session cache, backed by an asynchronous store.

OpenSSL asks its get-session callback synchronously, inside the handshake.
A network store cannot answer there without blocking the reactor, so the
lookup happens earlier: the watched connection parses the ClientHello before
OpenSSL sees it, :meth:`ExternalSessions.prefetch` fetches the offered
session IDs (TLS 1.2) or stateful-ticket PSK identities (TLS 1.3) from the
store, and only then are the bytes handed to OpenSSL, whose callback reads
the fetched session from a local buffer.
"""

from __future__ import annotations

import hashlib
import time
import weakref
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred, DeferredList, TimeoutError
from twisted.logger import Logger

from twisted_sesscache.clienthello import ClientHello
from twisted_sesscache.runtime import OpenSSLAccess
from twisted_sesscache.sealing import SealError, Sealer
from twisted_sesscache.stores import SessionStore

# A stateful ticket's PSK identity is the session ID, at most 32 bytes; a
# longer identity is a stateless ticket no store holds.
_MAX_STORED_ID = 32
# A hello offers one session ID and, in practice, one or two PSK identities.
_MAX_LOOKUPS = 4
SESSION_KIND = b"session"
TLS13 = 0x0304


class ExternalSessions:
    """Writes new server sessions to a store and finds offered ones in it."""

    log = Logger()

    def __init__(
        self,
        store: SessionStore,
        sealer: Sealer,
        runtime: OpenSSLAccess,
        *,
        lookup_timeout: float = 0.05,
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.store = store
        self.sealer = sealer
        self.runtime = runtime
        self.lookup_timeout = lookup_timeout
        self._reactor = reactor
        self.counts = {"store_hits": 0, "store_misses": 0, "store_timeouts": 0, "store_rejected": 0, "store_writes": 0}
        self._fetched: weakref.WeakKeyDictionary[SSL.Connection, dict[bytes, bytes]] = weakref.WeakKeyDictionary()
        self._rejections_logged: set[str] = set()

    def wire(self, context: SSL.Context, sid_context: bytes) -> None:
        """Install OpenSSL's new/remove/get callbacks on one context."""

        def on_new(connection: SSL.Connection | None, session: SSL.Session) -> None:
            ttl = self.runtime.session_expiry(session) - int(time.time())
            if ttl <= 0:
                return
            record = self.sealer.seal(self.runtime.session_to_der(session), kind=SESSION_KIND, context=sid_context)
            self.counts["store_writes"] += 1
            self.store.set(self.key(sid_context, self.runtime.session_id(session)), record, ttl).addErrback(_counted)

        def on_remove(session: SSL.Session) -> None:
            self.store.delete(self.key(sid_context, self.runtime.session_id(session))).addErrback(_counted)

        def on_get(connection: SSL.Connection | None, session_id: bytes) -> bytes | None:
            fetched = self._fetched.get(connection) if connection is not None else None
            return fetched.pop(session_id, None) if fetched else None

        self.runtime.set_session_callbacks(context, new=on_new, remove=on_remove, get=on_get)

    @staticmethod
    def key(sid_context: bytes, session_id: bytes) -> bytes:
        """Store key: which listener configuration, then which session."""
        return hashlib.sha256(sid_context).hexdigest()[:16].encode() + b":" + session_id.hex().encode()

    def prefetch(
        self, connection: SSL.Connection, sid_context: bytes, hello: ClientHello, *, tls13: bool
    ) -> Deferred[None] | None:
        """Fetch what the hello offers into the connection's buffer; None if it offers nothing stored.

        When both sides speak TLS 1.3, the legacy session ID is the random
        value of middlebox compatibility mode, not a session: only the PSK
        identities are looked up, sparing the store a query per new client.
        """
        legacy = () if tls13 and TLS13 in hello.supported_versions else (hello.session_id,)
        offered = [i for i in (*legacy, *hello.psk_identities) if 0 < len(i) <= _MAX_STORED_ID]
        if not offered:
            return None
        lookups = [self._lookup(connection, sid_context, i) for i in dict.fromkeys(offered[:_MAX_LOOKUPS])]
        done: Deferred[Any] = DeferredList(lookups, consumeErrors=True)
        return done.addCallback(lambda _: None)

    def _lookup(self, connection: SSL.Connection, sid_context: bytes, session_id: bytes) -> Deferred[None]:
        def found(record: bytes | None) -> None:
            if record is None:
                self.counts["store_misses"] += 1
                return
            der = self._open(record, sid_context)
            if der is not None:
                self.counts["store_hits"] += 1
                self._fetched.setdefault(connection, {})[session_id] = der

        def failed(failure: Any) -> None:
            if failure.check(TimeoutError):
                self.counts["store_timeouts"] += 1
            else:
                self.counts["store_misses"] += 1

        lookup = self.store.get(self.key(sid_context, session_id))
        lookup.addTimeout(self.lookup_timeout, self._reactor)
        return lookup.addCallbacks(found, failed)

    def _open(self, record: bytes, sid_context: bytes) -> bytes | None:
        """The record's DER if it opens and OpenSSL accepts it; counted and dropped otherwise."""
        try:
            der = self.sealer.open(record, kind=SESSION_KIND, context=sid_context)
            self.runtime.session_from_der(der)
        except (SealError, ValueError) as error:
            self.counts["store_rejected"] += 1
            reason = type(error).__name__
            if reason not in self._rejections_logged:
                self._rejections_logged.add(reason)
                self.log.warn(
                    "Dropped a stored session that does not open ({reason}: {error}); "
                    "the handshake goes on as a full one. Further ones are only counted.",
                    reason=reason,
                    error=error,
                )
            return None
        return der

    def forget(self, connection: SSL.Connection) -> None:
        """Drop what was fetched for a connection whose handshake is over."""
        self._fetched.pop(connection, None)


def _counted(failure: Any) -> None:
    """Store failures are counted by the store itself; the handshake never waits on a write."""

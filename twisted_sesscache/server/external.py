"""OpenSSL's external session cache, backed by an asynchronous store.

OpenSSL asks its get-session callback synchronously, inside the handshake.
A network store cannot answer there without blocking the reactor, so the
lookup happens earlier: the watched connection parses the ClientHello before
OpenSSL sees it, :meth:`ExternalSessions.prefetch` fetches the offered
session IDs (TLS 1.2) or stateful-ticket PSK identities (TLS 1.3) from the
store, and only then are the bytes handed to OpenSSL, whose callback reads
the fetched session from a local buffer.

A store that answers at once (``answers_at_once``: the memory and LMDB
stores) needs none of that: OpenSSL's callback asks it directly, and only for
the sessions OpenSSL's own cache does not hold, so the hello is not read.
For a store that answers later, the sessions OpenSSL's own cache holds are
not fetched either: each context keeps the IDs its new-session callback saw,
and those its get-session callback answered (OpenSSL adds them to its own
cache), that its remove callback has not taken back.
"""

from __future__ import annotations

import functools
import hashlib
import time
import weakref
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred, DeferredList

from twisted_sesscache.tls.clienthello import ClientHello
from twisted_sesscache._openssl import OpenSSLAccess
from twisted_sesscache.sealing import RecordSealer
from twisted_sesscache.interfaces import ISessionStore
from twisted_sesscache.modes import CacheMode
from twisted_sesscache.stores.sealed import SealedRecords

# A stateful ticket's PSK identity is the session ID, at most 32 bytes; a
# longer identity is a stateless ticket no store holds.
_MAX_STORED_ID = 32
# A hello offers one session ID and, in practice, one or two PSK identities.
_MAX_LOOKUPS = 4
SESSION_KIND = b"session"
TLS13 = 0x0304


class ExternalSessions:
    """Writes new server sessions to a store and finds offered ones in it."""

    def __init__(
        self,
        store: ISessionStore,
        sealer: RecordSealer,
        runtime: OpenSSLAccess,
        *,
        lookup_timeout: float = 0.05,
        reactor: Any = None,
        tickets: bool = False,
    ) -> None:
        self.records = SealedRecords(store, sealer, SESSION_KIND, timeout=lookup_timeout, reactor=reactor)
        self.runtime = runtime
        # Stateless tickets on (tickets=yes|shared; then the store answers at once, see
        # sharing.py): a TLS 1.3 session travels in its ticket and is never looked up by its
        # (dummy) ID, though OpenSSL still reports it to the new-session callback.
        self.tickets = tickets
        # Looked up inside OpenSSL's callback, no prefetch: the hello need not be read.
        self.synchronous = bool(store.answers_at_once)
        # A synchronous store: lookups made so far for each connection in the callback
        # (bounded, as a prefetch is). A store that answers later: what each prefetch found.
        self._asked: weakref.WeakKeyDictionary[SSL.Connection, int] = weakref.WeakKeyDictionary()
        self._fetched: weakref.WeakKeyDictionary[SSL.Connection, dict[bytes, SSL.Session]] = (
            weakref.WeakKeyDictionary()
        )
        # Per context (by id): session IDs in its OpenSSL cache, which OpenSSL resumes without asking.
        self._held: dict[int, set[bytes]] = {}

    @property
    def counts(self) -> dict[str, int]:
        return self.records.counts

    def wire(self, context: SSL.Context, sid_context: bytes) -> None:
        """Install OpenSSL's new/remove/get callbacks on one context."""
        held = self._held_ids(context)

        def on_new(connection: SSL.Connection | None, session: SSL.Session) -> None:
            if self._in_ticket(session):
                return
            ttl = self.runtime.session_expiry(session) - int(time.time())
            session_id = self.runtime.session_id(session)
            if held is not None and _never_switched(context):
                held.add(session_id)
            self.records.put(self.key(sid_context, session_id), self.runtime.session_to_der(session), sid_context, ttl)

        def on_remove(session: SSL.Session) -> None:
            if self._in_ticket(session):
                return  # never written
            session_id = self.runtime.session_id(session)
            if held is not None:
                held.discard(session_id)
            self.records.delete(self.key(sid_context, session_id))

        def on_get(connection: SSL.Connection | None, session_id: bytes) -> SSL.Session | None:
            # Kept until the handshake ends (forget): after a HelloRetryRequest
            # OpenSSL looks the same identity up again for the second ClientHello.
            if connection is None:
                return None
            if self.synchronous:
                return self._lookup_now(connection, sid_context, session_id)
            fetched = self._fetched.get(connection)
            session = fetched.get(session_id) if fetched else None
            if session is not None and held is not None and _never_switched(context):
                held.add(session_id)  # OpenSSL adds what this returns to its own cache: not fetched again
            return session

        self.runtime.set_session_callbacks(context, new=on_new, remove=on_remove, get=on_get)

    def _in_ticket(self, session: SSL.Session) -> bool:
        """A TLS 1.3 session whose stateless ticket holds it: nothing for the store."""
        return self.tickets and self.runtime.session_protocol_version(session) == TLS13

    def _held_ids(self, context: SSL.Context) -> set[bytes] | None:
        """The set of IDs held in ``context``'s own cache; None when OpenSSL would not resume from it.

        Only for stores that answer later (the others are asked on a miss, by
        OpenSSL), and only when OpenSSL both stores and looks up sessions itself.
        """
        mode = context.get_session_cache_mode()
        if self.synchronous or mode & int(CacheMode.NO_INTERNAL) or not mode & int(CacheMode.SERVER):
            return None
        held = self._held[id(context)] = set()
        weakref.finalize(context, self._held.pop, id(context), None)  # before its address is reused
        return held

    def holds(self, context: SSL.Context, session_id: bytes) -> bool:
        """Whether OpenSSL's own cache of ``context`` has the session: no need to fetch it."""
        held = self._held.get(id(context))
        return held is not None and session_id in held and _never_switched(context)

    @staticmethod
    def key(sid_context: bytes, session_id: bytes) -> bytes:
        """Store key: which listener configuration, then which session."""
        return _listener_prefix(sid_context) + session_id.hex().encode()

    def prefetch(
        self, connection: SSL.Connection, sid_context: bytes, hello: ClientHello, *, tls13: bool
    ) -> Deferred[None] | None:
        """Fetch what the hello offers into the connection's buffer; None if it offers nothing to fetch.

        When both sides speak TLS 1.3, the legacy session ID is the random
        value of middlebox compatibility mode, not a session: only the PSK
        identities are looked up, sparing the store a query per new client.
        A session OpenSSL holds itself is resumed from there: it is not fetched.
        """
        if tls13 and TLS13 in hello.supported_versions:
            legacy: tuple[bytes, ...] = ()
        else:
            legacy = (hello.session_id,)
        context = connection.get_context()
        offered = [i for i in (*legacy, *hello.psk_identities)
                   if 0 < len(i) <= _MAX_STORED_ID and not self.holds(context, i)]
        if not offered:
            return None
        lookups = [self._lookup(connection, sid_context, i) for i in dict.fromkeys(offered[:_MAX_LOOKUPS])]
        if len(lookups) == 1:
            return lookups[0]  # the usual hello: one identity (a lookup never fails)
        done: Deferred[Any] = DeferredList(lookups, consumeErrors=True)
        return done.addCallback(lambda _: None)

    def _lookup_now(self, connection: SSL.Connection, sid_context: bytes, session_id: bytes) -> SSL.Session | None:
        """The stored session, from a store that answers at once; at most _MAX_LOOKUPS per connection."""
        asked = self._asked.get(connection, 0)
        if asked >= _MAX_LOOKUPS or not 0 < len(session_id) <= _MAX_STORED_ID:
            return None
        self._asked[connection] = asked + 1
        answer: list[SSL.Session | None] = []
        self._fetch(sid_context, session_id).addCallback(answer.append)
        return answer[0] if answer else None  # a store that did not answer at once: a miss

    def _lookup(self, connection: SSL.Connection, sid_context: bytes, session_id: bytes) -> Deferred[None]:
        def found(session: SSL.Session | None) -> None:
            if session is not None:
                self._fetched.setdefault(connection, {})[session_id] = session

        return self._fetch(sid_context, session_id).addCallback(found)

    def _fetch(self, sid_context: bytes, session_id: bytes) -> Deferred[SSL.Session | None]:
        def decode(der: bytes) -> SSL.Session:
            # OpenSSL must accept the session, and it must be the one asked for: a
            # session under another ID would fail the handshake instead of giving a full one.
            session = self.runtime.session_from_der(der)
            if self.runtime.session_id(session) != session_id:
                raise ValueError("the stored session carries another session ID than its key")
            return session

        return self.records.fetch(self.key(sid_context, session_id), sid_context, decode)

    def forget(self, connection: SSL.Connection) -> None:
        """Drop what was fetched for a connection whose handshake is over.

        A synchronous store's lookup counts stay until the connection goes
        (weak keys): most connections have none, and looking costs a weak reference.
        """
        if not self.synchronous:
            self._fetched.pop(connection, None)


def _never_switched(context: SSL.Context) -> bool:
    """No servername callback: a connection begun on ``context`` keeps its sessions in its cache.

    After an SNI callback switches a connection to another context, OpenSSL
    still caches its session in the first one (the session context), while the
    callbacks run as the second's: a set kept per context would be wrong there.
    """
    return getattr(context, "_tlsext_servername_callback", False) is None


@functools.lru_cache(maxsize=256)
def _listener_prefix(sid_context: bytes) -> bytes:
    """The first part of a store key, the same for every session of a listener (hashed once)."""
    return hashlib.sha256(sid_context).hexdigest()[:16].encode() + b":"

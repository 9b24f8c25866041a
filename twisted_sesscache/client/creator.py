"""Client connection creators that offer a cached session and learn the ones each connection makes.

A :class:`SessionClientCreator` wraps a Twisted creator; each connection it
makes gets a :class:`_ClientHandshake` (what it offered, what it learned) and
is handed to Twisted as a :class:`_ClientConnection`, which tells that
handshake when the handshake starts, ends, reads, or fails fatally.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol, cast
from weakref import WeakKeyDictionary

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from twisted_sesscache._openssl import OpenSSLAccess
from twisted_sesscache.client.contexts import state_of
from twisted_sesscache.client.key import SessionKey, connection_alpn, settings_digest
from twisted_sesscache.client.shared import SharedClientSessions
from twisted_sesscache.tls.clienthello import ClientHello
from twisted_sesscache.tls.connection import WatchedConnection

TLS1_3_VERSION = 0x0304
_NOT_FATAL = (SSL.WantReadError, SSL.WantWriteError, SSL.WantX509LookupError, SSL.ZeroReturnError)


class SessionSource(Protocol):
    """What a creator and its connections need from the cache (``ClientSessionCache`` is one)."""

    log: Logger
    runtime: OpenSSLAccess
    keep_sessions_on_truncation: bool
    shared: SharedClientSessions | None

    def take(self, key: SessionKey) -> bytes | None: ...

    def remember(self, key: SessionKey, session: SSL.Session, *, tls13: bool) -> bytes | None: ...

    def forget(self, key: SessionKey, ders: Iterable[bytes]) -> int: ...

    def prepare_context(self, context: SSL.Context) -> bool: ...

    def count(self, name: str) -> None: ...


@implementer(IOpenSSLClientConnectionCreator)
class SessionClientCreator:
    """An ``IOpenSSLClientConnectionCreator`` that offers cached sessions and learns new ones.

    The wrapped creator still makes the connection, so its verification
    (service-identity hostname checks from ``optionsForClientTLS``) runs on
    every full handshake; a resumed one reuses a session that passed those
    checks under the very same key.
    """

    def __init__(
        self,
        cache: SessionSource,
        inner: IOpenSSLClientConnectionCreator,
        hostname: str,
        port: int | None,
        alpn: tuple[bytes, ...],
        fixed_settings: str,
    ) -> None:
        self.cache = cache
        self.inner = inner
        self.hostname = hostname
        self.port = port
        self._alpn = alpn
        self._fixed = fixed_settings
        self._settings: WeakKeyDictionary[SSL.Context, str] = WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"<SessionClientCreator {self.hostname}:{self.port or '*'} around {self.inner!r}>"

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = self.inner.clientConnectionForTLS(tlsProtocol)
        context = connection.get_context()
        state = state_of(context)
        if state is None or not state.prepared:
            # Made before the context was prepared (a creator whose context
            # wrap() could not reach): its session-ID context is not ours, so
            # this one connection neither offers nor learns.
            self.cache.prepare_context(context)
            return connection
        settings = self._settings.get(context)
        if settings is None:
            settings = self._settings[context] = settings_digest(self._fixed, context, connection, state.versions)
        server_name = connection.get_servername()
        key = SessionKey(
            hostname=self.hostname,
            server_name=server_name.decode("ascii") if server_name else None,
            port=self.port,
            alpn=connection_alpn(tlsProtocol, self._alpn),
            settings=settings,
        )
        handshake = _ClientHandshake(self.cache, key, fill_port=self.port is None, callbacks=state.callbacks)
        _handshakes[connection] = handshake
        watched = _ClientConnection(
            connection,
            handshake,
            keep_session_on_eof=self.cache.keep_sessions_on_truncation,
            runtime=self.cache.runtime,
        )
        return cast(SSL.Connection, watched)  # Twisted drives it as the Connection it stands in for


@dataclass
class _ClientHandshake:
    """One client connection's view of the cache: what it offered, what it learned."""

    cache: SessionSource
    key: SessionKey
    fill_port: bool
    callbacks: bool
    offered: SSL.Session | None = None
    offered_der: bytes | None = None
    learned: list[bytes] = field(default_factory=list)
    tls13: bool = False
    # Bundled runtime: the session seen last, held so that its address cannot be reused.
    baseline: SSL.Session | None = None
    baseline_id: int = 0
    watches_reads = True  # TLS 1.3 tickets arrive in reads after the handshake

    def client_hello(self, connection: WatchedConnection, hello: ClientHello) -> Deferred[None] | None:
        """Server side only; client connections do not read a ClientHello."""
        return None

    def holds_session(self, connection: WatchedConnection, session_id: bytes) -> bool:
        return False

    def handshake_started(self, connection: WatchedConnection) -> Deferred[None] | None:
        cache = self.cache
        cache.count("connect")
        if self.fill_port:
            self.key = replace(self.key, port=_peer_port(connection.connection))
        der = cache.take(self.key)
        if der is None and cache.shared is not None:
            fetched = cache.shared.fetch(self.key)
            return fetched.addCallback(lambda found: self._offer(connection, found[0] if found else None))
        self._offer(connection, der)
        return None

    def _offer(self, connection: WatchedConnection, der: bytes | None) -> None:
        cache = self.cache
        if der is None:
            return
        try:
            session = cache.runtime.session_from_der(der)
            cache.runtime.offer_session(connection.connection, session)
        except (ValueError, SSL.Error):
            cache.log.warn("Dropped an unusable cached TLS session for {key}", key=str(self.key))  # noqa: G010
            cache.forget(self.key, [der])
            return
        self.offered, self.offered_der = session, der
        cache.count("offered")

    def handshake_done(self, connection: WatchedConnection) -> None:
        cache, runtime, ssl = self.cache, self.cache.runtime, connection.connection
        cache.count("connect_good")
        resumed = runtime.session_reused(ssl)
        self.tls13 = ssl.get_protocol_version() >= TLS1_3_VERSION
        if resumed:
            cache.count("hits")
        elif self.offered is not None:
            cache.count("misses")
            cache.log.debug("{key} did not resume the session offered; full handshake", key=str(self.key))
        if self.tls13:
            # Not resumable until tickets arrive, with reads (design.md, fact 5).
            if not self.callbacks:
                self._rebase(ssl)
        elif not self.learned:
            # TLS 1.2: a full handshake, or a resumption that renewed the ticket
            # (OpenSSL does not call the new-session callback for those).
            offered_id = runtime.session_identity(self.offered) if self.offered is not None else None
            if not resumed or runtime.current_session_identity(ssl) != offered_id:
                self._learn(ssl.get_session())
        self.offered = None  # the connection holds its own reference

    def after_read(self, connection: WatchedConnection) -> None:
        if self.baseline is None:
            return
        ssl = connection.connection
        if self.cache.runtime.current_session_identity(ssl) != self.baseline_id:
            self._learn(self._rebase(ssl))

    def session_made(self, connection: SSL.Connection, session: SSL.Session) -> None:
        """Shared runtime: OpenSSL made a session (TLS 1.2 full handshake, or a TLS 1.3 ticket)."""
        self.tls13 = connection.get_protocol_version() >= TLS1_3_VERSION
        self._learn(session)

    def failed(self, connection: WatchedConnection) -> None:
        """A fatal error: forget what this connection learned, and what it resumed (RFC 5246, 7.2)."""
        if connection.truncated:  # only set when truncation keeps sessions
            return
        doomed = list(self.learned)
        if self.offered_der is not None and self.cache.runtime.session_reused(connection.connection):
            doomed.append(self.offered_der)
        self.learned.clear()
        self.offered_der = None
        if doomed:
            self.cache.forget(self.key, doomed)

    def _learn(self, session: SSL.Session | None) -> None:
        if session is None:
            return
        der = self.cache.remember(self.key, session, tls13=self.tls13)
        if der is not None:
            self.learned.append(der)

    def _rebase(self, ssl: SSL.Connection) -> SSL.Session | None:
        self.baseline = ssl.get_session()
        self.baseline_id = self.cache.runtime.session_identity(self.baseline) if self.baseline else 0
        return self.baseline


_handshakes: WeakKeyDictionary[SSL.Connection, _ClientHandshake] = WeakKeyDictionary()


def new_session(connection: SSL.Connection | None, session: SSL.Session) -> None:
    """SSL_CTX_sess_set_new_cb for client contexts: hand the session to the connection's handshake."""
    handshake = _handshakes.get(connection) if connection is not None else None
    if handshake is not None and connection is not None:
        handshake.session_made(connection, session)


class _ClientConnection(WatchedConnection):
    """A watched client connection that also reports fatal errors, so their sessions can go."""

    def __init__(
        self,
        connection: SSL.Connection,
        handshake: _ClientHandshake,
        *,
        keep_session_on_eof: bool,
        runtime: OpenSSLAccess,
    ) -> None:
        super().__init__(connection, handshake, keep_session_on_eof=keep_session_on_eof, runtime=runtime)
        self._handshake = handshake

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except _NOT_FATAL:
            raise
        except SSL.Error:
            self._handshake.failed(self)
            raise

    def recv(self, bufsiz: int, flags: int | None = None) -> bytes:
        try:
            return super().recv(bufsiz, flags)
        except _NOT_FATAL:
            raise
        except SSL.Error:
            self._handshake.failed(self)
            raise


def _peer_port(connection: SSL.Connection) -> int | None:
    """The remote port of the transport under Twisted's TLS protocol (the app data)."""
    transport = getattr(connection.get_app_data(), "transport", None)
    peer = transport.getPeer() if transport is not None else None
    port = getattr(peer, "port", None)
    return port if isinstance(port, int) else None


__all__ = ["TLS1_3_VERSION", "SessionClientCreator", "SessionSource", "new_session"]

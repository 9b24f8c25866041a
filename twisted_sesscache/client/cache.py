"""Client-side resumption: which session a Twisted client offers, and when it learns a new one.

OpenSSL's client cache mode leaves the choice of session to the application
(SSL_CTX_set_session_cache_mode(3)). The choice made here: a session is offered
only to a connection whose :class:`SessionKey` matches the one it was learned
under (server name and port, trust roots, verification, client certificate,
ALPN, protocol versions), a TLS 1.3 ticket is offered at most once (RFC 8446,
appendix C.4), and a TLS 1.2 session is offered until it is replaced or expires.

Sessions are kept as DER bytes, never as live ``SSL_SESSION`` objects: OpenSSL
marks a session object unusable in place when any connection sharing it is
freed without having sent close_notify (``ssl_clear_bad_session``), which is
exactly what a truncated close does. Each offer decodes a fresh object, so one
connection's fate does not decide another's; fatal errors and, in strict mode,
truncation remove the affected sessions explicitly instead.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IProtocolNegotiationFactory
from twisted.internet.ssl import CertificateOptions, PrivateCertificate, optionsForClientTLS
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from twisted_sesscache.client.shared import SharedClientSessions
from twisted_sesscache.client.sessions import DEFAULT_CLIENT_SIZE, DEFAULT_PER_KEY, ClientSessions, Entry
from twisted_sesscache.tls.connection import WatchedConnection
from twisted_sesscache.modes import CacheMode
from twisted_sesscache._openssl import OpenSSLAccess, runtime as openssl_runtime
from twisted_sesscache.tls.session_der import session_facts
from twisted_sesscache.trust import fingerprint, resolve_trust_root, trust_fingerprint

if TYPE_CHECKING:
    from twisted_sesscache.cache import SessionCache

DEFAULT_TIMEOUT = 300
CLIENT_CONTEXT_MODE = CacheMode.CLIENT | CacheMode.NO_INTERNAL_STORE
# OpenSSL refuses, fatally, a resumption whose session carries another session-ID
# context than the connection's, and Twisted gives every CertificateOptions
# context a random one; client contexts prepared here all share this one.
CLIENT_SESSION_ID_CONTEXT = b"twisted-sesscache client"
TLS1_3_VERSION = 0x0304
_VERSION_OPTIONS = (
    SSL.OP_NO_SSLv2
    | SSL.OP_NO_SSLv3
    | SSL.OP_NO_TLSv1
    | SSL.OP_NO_TLSv1_1
    | SSL.OP_NO_TLSv1_2
    | getattr(SSL, "OP_NO_TLSv1_3", 0)
)
_NOT_FATAL = (SSL.WantReadError, SSL.WantWriteError, SSL.WantX509LookupError, SSL.ZeroReturnError)
_INTROSPECT: Any = object()  # wrap(): "read this from the wrapped creator"


@dataclass(frozen=True)
class SessionKey:
    """Everything that must match before a session learned on one connection is offered on another."""

    hostname: str
    """The name the server's certificate was verified against (IDNA ASCII or an IP address)."""
    server_name: str | None
    """The SNI actually sent, or None."""
    port: int | None
    alpn: tuple[bytes, ...]
    settings: str
    """Digest of trust roots, verification mode and depth, client certificate,
    protocol version limits, cipher list, the creator's type and any extra key."""

    def __str__(self) -> str:
        return (
            f"{self.hostname}:{self.port} sni={self.server_name} alpn={list(self.alpn)} settings={self.settings[:12]}"
        )


class ClientSessionCache:
    """The sessions this process offers when it connects out, and the creators that offer them.

    Asking for a creator (:meth:`creator`, :meth:`wrap`, :meth:`https_policy`)
    turns client-side resumption on for that creator whatever the parent
    cache's mode: the mode's ``client`` bit is what tells components that build
    their own clients (the ``twistd sesscache`` upstream leg) to come here.
    """

    log = Logger()

    def __init__(
        self,
        *,
        size: int = DEFAULT_CLIENT_SIZE,
        per_key: int = DEFAULT_PER_KEY,
        timeout: int = DEFAULT_TIMEOUT,
        keep_sessions_on_truncation: bool = True,
        runtime: OpenSSLAccess | None = None,
        clock: Any = None,
        shared: SharedClientSessions | None = None,
    ) -> None:
        self.sessions = ClientSessions(size, per_key)
        self.timeout = timeout
        self.keep_sessions_on_truncation = keep_sessions_on_truncation
        self.runtime: OpenSSLAccess = runtime or openssl_runtime()
        self._clock = clock
        self.shared = shared
        self._counts = dict.fromkeys(("connect", "connect_good", "hits", "misses", "offered", "invalidated"), 0)

    @property
    def clock(self) -> Any:
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor
        return self._clock

    # -- creators ------------------------------------------------------------

    def creator(
        self,
        hostname: str,
        *,
        trust_root: Any = None,
        client_certificate: PrivateCertificate | None = None,
        alpn: Sequence[bytes] = (),
        port: int | None = None,
        extra_options: dict[str, Any] | None = None,
        send_server_name: bool | None = None,
    ) -> SessionClientCreator:
        """``optionsForClientTLS(hostname, ...)`` that resumes sessions.

        ``trust_root`` is anything ``optionsForClientTLS`` takes, a PEM file or
        directory path, or None for the platform's trust store. ``port`` pins
        the key to a logical port; by default the connected peer's port is
        used. TLS 1.2 session tickets are enabled unless ``extra_options``
        (passed to ``CertificateOptions``) says ``enableSessionTickets=False``.
        """
        options = optionsForClientTLS(
            hostname,
            trustRoot=resolve_trust_root(trust_root),
            clientCertificate=client_certificate,
            acceptableProtocols=list(alpn) or None,
            extraCertificateOptions={"enableSessionTickets": True, **(extra_options or {})},
            sendServerName=send_server_name,
        )
        return self.wrap(options, port=port)

    def wrap(
        self,
        creator: Any,
        *,
        hostname: str | None = None,
        port: int | None = None,
        trust_root: Any = _INTROSPECT,
        extra_key: Hashable = (),
    ) -> SessionClientCreator:
        """Make an existing client connection creator resume sessions.

        For an ``optionsForClientTLS`` result, the hostname, trust root and ALPN
        list are read from it. Any other ``IOpenSSLClientConnectionCreator``
        needs ``hostname`` and ``trust_root`` (None: no verification) spelled
        out, and ``extra_key`` for any setting that the key cannot see but that
        must separate sessions (a custom verify callback, say).
        """
        if isinstance(creator, SessionClientCreator):
            if creator.cache is self:
                return creator
            creator = creator.inner
        if not IOpenSSLClientConnectionCreator.providedBy(creator):
            raise TypeError(f"{creator!r} is not an IOpenSSLClientConnectionCreator")
        options = _certificate_options_of(creator)
        verified = getattr(creator, "_hostnameASCII", None)
        if hostname is None:
            hostname = verified
        elif verified is not None and _ascii_host(hostname) != verified:
            raise ValueError(f"hostname {hostname!r} is not the name {verified!r} that the creator verifies")
        if hostname is None:
            raise ValueError(f"cannot tell which hostname {creator!r} verifies: pass hostname=")
        if trust_root is _INTROSPECT:
            if options is None:
                raise ValueError(f"cannot read the trust root of {creator!r}: pass trust_root=")
            trust_root = options.trustRoot
        alpn = tuple(getattr(options, "_acceptableProtocols", None) or ())
        fixed = "\0".join((type(creator).__qualname__, trust_fingerprint(trust_root), repr(extra_key)))
        context = _context_of(creator, options)
        if context is not None:
            # Before the first connection: it copies the session-ID context,
            # and pyOpenSSL 25+ freezes a context once it has made one.
            self.prepare_context(context)
        return SessionClientCreator(self, creator, _ascii_host(hostname), port, alpn, fixed)

    def https_policy(
        self,
        *,
        trust_root: Any = None,
        client_certificate: PrivateCertificate | None = None,
        alpn: Sequence[bytes] = (),
        extra_options: dict[str, Any] | None = None,
        creators: int = 128,
    ) -> SessionHTTPSPolicy:
        """An ``IPolicyForHTTPS`` for ``Agent`` and treq whose connections resume sessions."""
        return SessionHTTPSPolicy(
            self,
            trust_root=resolve_trust_root(trust_root),
            client_certificate=client_certificate,
            alpn=alpn,
            extra_options=extra_options,
            creators=creators,
        )

    # -- the store -------------------------------------------------------------

    def take(self, key: SessionKey) -> bytes | None:
        """The session to offer for ``key`` as DER, or None; a TLS 1.3 one leaves the cache."""
        entry = self.sessions.take(key, self.clock.seconds())
        return None if entry is None else entry.der

    def remember(self, key: SessionKey, session: SSL.Session, *, tls13: bool) -> bytes | None:
        """Keep ``session`` for ``key`` if it can be resumed; returns the DER kept."""
        der = self.runtime.session_to_der(session)
        facts = session_facts(der)
        if facts is not None and not facts.resumable:
            return None
        now = self.clock.seconds()
        expires = now + self.timeout
        if facts is not None and facts.expiry is not None:
            expires = min(expires, facts.expiry)
        if expires <= now:
            return None
        self.sessions.put(key, Entry(der, tls13, expires))
        if self.shared is not None:
            self.shared.publish(key, der, tls13=tls13, ttl=int(expires - now))
        return der

    def forget(self, key: SessionKey, ders: Iterable[bytes]) -> int:
        removed = self.sessions.forget(key, ders)
        self._counts["invalidated"] += removed
        return removed

    def flush(self, now: float | None = None) -> int:
        """Remove expired sessions (the parent's reactor flush calls this)."""
        removed = self.sessions.flush(self.clock.seconds() if now is None else now)
        if removed:
            self.log.debug("Flushed {removed} expired client TLS sessions", removed=removed)
        return removed

    def clear(self) -> None:
        self.sessions.clear()

    def stats(self) -> dict[str, Any]:
        """Counted from handshakes, the same in both runtimes.

        ``misses`` are connections that offered a session the server did not
        resume (it forgot it); they still connected, with a full handshake.
        """
        return {
            **self._counts,
            "number": len(self.sessions),
            "expired": self.sessions.expired,
            "evicted": self.sessions.evicted,
            "size_limit": self.sessions.size,
            "per_key": self.sessions.per_key,
            "timeout": self.timeout,
            **(self.shared.counts if self.shared is not None else {}),
        }

    # -- contexts and connections ------------------------------------------------

    def prepare_context(self, context: SSL.Context) -> bool:
        """Client cache mode (no internal store: sessions live here), timeout,
        session-ID context, new-session callback.

        Done once per context, and before its first connection: an ``SSL``
        copies the context's session-ID context when it is made. A context
        shared by several caches keeps the first one's timeout, while sessions
        always go to the cache of the creator that made the connection.
        """
        if getattr(context, "_sesscache_client", False):
            return True
        try:
            versions = self.runtime.context_options(context) & _VERSION_OPTIONS
            context.set_session_cache_mode(int(CLIENT_CONTEXT_MODE))
            context.set_timeout(self.timeout)
            context.set_session_id(CLIENT_SESSION_ID_CONTEXT)
        except ValueError:  # pyOpenSSL 25+: "Context has already been used to create a Connection"
            if not getattr(context, "_sesscache_client_refused", False):
                context._sesscache_client_refused = True  # type: ignore[attr-defined]
                self.log.warn(  # noqa: G010 - twisted.logger spells it warn
                    "A client TLS context made connections before twisted-sesscache saw it, and "
                    "pyOpenSSL no longer lets it change: its connections will not resume. Wrap "
                    "the creator before its first connection (an optionsForClientTLS result, "
                    "a CertificateOptions, or a creator with getContext())."
                )
            return False
        callbacks = self.runtime.shared
        if callbacks:
            self.runtime.set_session_callbacks(context, new=_new_session)
        context._sesscache_client_versions = versions  # type: ignore[attr-defined]
        context._sesscache_client_callbacks = callbacks  # type: ignore[attr-defined]
        context._sesscache_client = True  # type: ignore[attr-defined]
        return True

    def count(self, name: str) -> None:
        self._counts[name] += 1


def _new_session(connection: SSL.Connection | None, session: SSL.Session) -> None:
    """SSL_CTX_sess_set_new_cb for client contexts: hand the session to the connection's handshake."""
    handshake = _handshakes.get(connection) if connection is not None else None
    if handshake is not None:
        handshake.session_made(connection, session)


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
        cache: ClientSessionCache,
        inner: Any,
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

    def clientConnectionForTLS(self, tlsProtocol: Any) -> WatchedConnection:
        connection = self.inner.clientConnectionForTLS(tlsProtocol)
        context = connection.get_context()
        if not getattr(context, "_sesscache_client", False):
            # Made before the context was prepared (a creator whose context
            # wrap() could not reach): its session-ID context is not ours, so
            # this one connection neither offers nor learns.
            self.cache.prepare_context(context)
            return connection
        server_name = connection.get_servername()
        key = SessionKey(
            hostname=self.hostname,
            server_name=server_name.decode("ascii") if server_name else None,
            port=self.port,
            alpn=_connection_alpn(tlsProtocol, self._alpn),
            settings=self._settings_of(context, connection),
        )
        handshake = _ClientHandshake(
            self.cache,
            key,
            fill_port=self.port is None,
            callbacks=getattr(context, "_sesscache_client_callbacks", False),
        )
        _handshakes[connection] = handshake
        return _ClientConnection(
            connection,
            handshake,
            keep_session_on_eof=self.cache.keep_sessions_on_truncation,
            runtime=self.cache.runtime,
        )

    def _settings_of(self, context: SSL.Context, connection: SSL.Connection) -> str:
        settings = self._settings.get(context)
        if settings is None:
            local = connection.get_certificate()
            digest = hashlib.sha256(b"twisted-sesscache client key v1\0")
            for part in (
                self._fixed,
                f"verify={context.get_verify_mode()}/{context.get_verify_depth()}",
                f"versions={getattr(context, '_sesscache_client_versions', 0):#x}",
                "client=" + (fingerprint(local) if local is not None else "none"),
                "ciphers=" + ":".join(connection.get_cipher_list()),
            ):
                digest.update(part.encode("utf-8", "backslashreplace") + b"\0")
            settings = self._settings[context] = digest.hexdigest()
        return settings


@dataclass
class _ClientHandshake:
    """One client connection's view of the cache: what it offered, what it learned."""

    cache: ClientSessionCache
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

    def client_hello(self, connection: WatchedConnection, hello: Any) -> None:
        """Server side only; client connections do not read a ClientHello."""

    def handshake_started(self, connection: WatchedConnection) -> Deferred[None] | None:
        cache = self.cache
        cache.count("connect")
        if self.fill_port:
            self.key = replace(self.key, port=_peer_port(connection.connection))
        der = cache.take(self.key)
        if der is None and cache.shared is not None:
            fetched = cache.shared.fetch(self.key)
            return fetched.addCallback(lambda found: self._offer(connection, found[0]) if found else None)
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


class _ClientConnection(WatchedConnection):
    """A watched client connection that also reports fatal errors, so their sessions can go."""

    def __init__(self, connection: SSL.Connection, handshake: _ClientHandshake, **kwargs: Any) -> None:
        super().__init__(connection, handshake, **kwargs)
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


@implementer(IPolicyForHTTPS)
class SessionHTTPSPolicy:
    """Like ``BrowserLikePolicyForHTTPS``, with resumption and one creator (one context) per netloc."""

    def __init__(
        self,
        cache: ClientSessionCache,
        *,
        trust_root: Any = None,
        client_certificate: PrivateCertificate | None = None,
        alpn: Sequence[bytes] = (),
        extra_options: dict[str, Any] | None = None,
        creators: int = 128,
    ) -> None:
        self.cache = cache
        self._options: dict[str, Any] = {
            "trust_root": trust_root,
            "client_certificate": client_certificate,
            "alpn": tuple(alpn),
            "extra_options": extra_options,
        }
        self._limit = creators
        self._creators: OrderedDict[tuple[str, int], SessionClientCreator] = OrderedDict()

    def creatorForNetloc(self, hostname: bytes | str, port: int) -> SessionClientCreator:
        host = hostname.decode("ascii") if isinstance(hostname, bytes) else hostname
        creator = self._creators.get((host, port))
        if creator is None:
            creator = self.cache.creator(host, port=port, **self._options)
            self._creators[(host, port)] = creator
            if len(self._creators) > self._limit:
                self._creators.popitem(last=False)
        else:
            self._creators.move_to_end((host, port))
        return creator


# -- small helpers -----------------------------------------------------------------


def _certificate_options_of(creator: Any) -> CertificateOptions | None:
    """The ``CertificateOptions`` behind an ``optionsForClientTLS`` result, or the creator itself."""
    if isinstance(creator, CertificateOptions):
        return creator
    owner = getattr(getattr(creator, "_createConnection", None), "__self__", None)
    return owner if isinstance(owner, CertificateOptions) else None


def _context_of(creator: Any, options: CertificateOptions | None) -> SSL.Context | None:
    """The context the creator's connections will use, when it can be had before the first one."""
    get_context = getattr(options if options is not None else creator, "getContext", None)
    context = get_context() if get_context is not None else None
    return context if isinstance(context, SSL.Context) else None


def _ascii_host(hostname: str) -> str:
    """The spelling service-identity verifies: IDNA for names, the address itself for IPs."""
    from twisted.internet.abstract import isIPAddress, isIPv6Address

    if isIPAddress(hostname) or isIPv6Address(hostname):
        return hostname
    from twisted.internet._idna import _idnaBytes

    return _idnaBytes(hostname).decode("ascii")


def _connection_alpn(tlsProtocol: Any, static: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """The ALPN list Twisted sets on this connection (as ``protosFromProtocol`` computes it)."""
    wrapped = getattr(getattr(tlsProtocol, "factory", None), "wrappedFactory", None)
    negotiation: Any = IProtocolNegotiationFactory(wrapped, None)
    if negotiation is None:
        return static
    return tuple(negotiation.acceptableProtocols()) + static


def _peer_port(connection: SSL.Connection) -> int | None:
    """The remote port of the transport under Twisted's TLS protocol (the app data)."""
    transport = getattr(connection.get_app_data(), "transport", None)
    peer = transport.getPeer() if transport is not None else None
    port = getattr(peer, "port", None)
    return port if isinstance(port, int) else None





__all__ = ["ClientSessionCache", "SessionClientCreator", "SessionHTTPSPolicy", "SessionKey"]

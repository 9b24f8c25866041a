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

from collections.abc import Hashable, Iterable, Sequence
from typing import Any, cast

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.internet.ssl import CertificateOptions, PrivateCertificate, optionsForClientTLS
from twisted.logger import Logger

from twisted_sesscache._openssl import OpenSSLAccess, runtime as openssl_runtime
from twisted_sesscache._twisted_compat import acceptable_protocols, certificate_options_of, hostname_of
from twisted_sesscache.client.contexts import ClientContextState, record, state_of
from twisted_sesscache.client.creator import SessionClientCreator, new_session
from twisted_sesscache.client.key import VERSION_OPTIONS, SessionKey, TrustRoot, ascii_host, creator_settings
from twisted_sesscache.client.policy import DEFAULT_CREATORS, SessionHTTPSPolicy
from twisted_sesscache.client.sessions import DEFAULT_CLIENT_SIZE, DEFAULT_PER_KEY, ClientSessions, Entry
from twisted_sesscache.client.shared import SharedClientSessions
from twisted_sesscache.config import DEFAULT_TIMEOUT
from twisted_sesscache.modes import CacheMode
from twisted_sesscache.tls.session_der import session_facts
from twisted_sesscache.trust import resolve_trust_root

CLIENT_CONTEXT_MODE = CacheMode.CLIENT | CacheMode.NO_INTERNAL_STORE
# OpenSSL refuses, fatally, a resumption whose session carries another session-ID
# context than the connection's, and Twisted gives every CertificateOptions
# context a random one; client contexts prepared here all share this one.
CLIENT_SESSION_ID_CONTEXT = b"twisted-sesscache client"
_INTROSPECT = object()  # wrap(): "read this from the wrapped creator"
_COUNTERS = ("connect", "connect_good", "hits", "misses", "offered", "invalidated")


class ClientSessionCache:
    """The sessions this process offers when it connects out, and the creators that offer them.

    Asking for a creator (:meth:`creator`, :meth:`wrap`, :meth:`https_policy`)
    turns client-side resumption on for that creator whatever a server-side
    cache's mode: the mode's ``client`` bit is what tells components that
    build their own clients (the ``twistd sesscache`` upstream leg) to come here.

    ``clock`` gives the time sessions are stamped and expired with (None: the
    global reactor, imported on first use); wall-clock seconds, as the expiry
    a session carries is. ``shared`` publishes learned sessions to a store and
    fetches missing ones from it (a fleet of proxies sharing upstream sessions).
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
        clock: IReactorTime | None = None,
        shared: SharedClientSessions | None = None,
    ) -> None:
        self.sessions = ClientSessions(size, per_key)
        self.timeout = timeout
        self.keep_sessions_on_truncation = keep_sessions_on_truncation
        self.runtime: OpenSSLAccess = runtime if runtime is not None else openssl_runtime()
        self.shared = shared
        self._clock = clock
        self._counts = dict.fromkeys(_COUNTERS, 0)

    @property
    def clock(self) -> IReactorTime:
        """The clock sessions are stamped and expired with (the global reactor unless one was given)."""
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = cast(IReactorTime, reactor)
        return self._clock

    # -- creators ------------------------------------------------------------

    def creator(
        self,
        hostname: str,
        *,
        trust_root: TrustRoot = None,
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
        creator: IOpenSSLClientConnectionCreator,
        *,
        hostname: str | None = None,
        port: int | None = None,
        trust_root: TrustRoot = _INTROSPECT,
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
        options = certificate_options_of(creator)
        hostname = _verified_hostname(creator, hostname)
        if trust_root is _INTROSPECT:
            if options is None:
                raise ValueError(f"cannot read the trust root of {creator!r}: pass trust_root=")
            trust_root = options.trustRoot
        alpn = acceptable_protocols(options) if options is not None else ()
        context = _context_of(creator, options)
        if context is not None:
            # Before the first connection: it copies the session-ID context,
            # and pyOpenSSL 25+ freezes a context once it has made one.
            self.prepare_context(context)
        fixed = creator_settings(type(creator), trust_root, extra_key)
        return SessionClientCreator(self, creator, ascii_host(hostname), port, alpn, fixed)

    def https_policy(
        self,
        *,
        trust_root: TrustRoot = None,
        client_certificate: PrivateCertificate | None = None,
        alpn: Sequence[bytes] = (),
        extra_options: dict[str, Any] | None = None,
        creators: int = DEFAULT_CREATORS,
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

    # -- the sessions --------------------------------------------------------------

    def take(self, key: SessionKey) -> bytes | None:
        """The session to offer for ``key`` as DER, or None; a TLS 1.3 one leaves the cache."""
        entry = self.sessions.take(key, self.clock.seconds())
        return None if entry is None else entry.der

    def remember(self, key: SessionKey, session: SSL.Session, *, tls13: bool) -> bytes | None:
        """Keep ``session`` for ``key`` if it can be resumed; returns the DER kept."""
        return self.remember_der(key, self.runtime.session_to_der(session), tls13=tls13)

    def remember_der(self, key: SessionKey, der: bytes, *, tls13: bool) -> bytes | None:
        """Keep an encoded session: for its own lifetime, capped by ``timeout``; None if not kept."""
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
        """Remove expired sessions (a server cache's reactor flush calls this)."""
        removed = self.sessions.flush(self.clock.seconds() if now is None else now)
        if removed:
            self.log.debug("Flushed {removed} expired client TLS sessions", removed=removed)
        return removed

    def clear(self) -> None:
        self.sessions.clear()

    def stats(self) -> dict[str, int]:
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

    def count(self, name: str) -> None:
        self._counts[name] += 1

    # -- contexts ------------------------------------------------------------------

    def prepare_context(self, context: SSL.Context) -> bool:
        """Client cache mode (no internal store: sessions live here), timeout,
        session-ID context, new-session callback.

        Done once per context, and before its first connection: an ``SSL``
        copies the context's session-ID context when it is made. A context
        shared by several caches keeps the first one's timeout, while sessions
        always go to the cache of the creator that made the connection.
        """
        state = state_of(context)
        if state is not None:
            return state.prepared
        try:
            versions = self.runtime.context_options(context) & VERSION_OPTIONS
            context.set_session_cache_mode(int(CLIENT_CONTEXT_MODE))
            context.set_timeout(self.timeout)
            context.set_session_id(CLIENT_SESSION_ID_CONTEXT)
        except ValueError:  # pyOpenSSL 25+: "Context has already been used to create a Connection"
            record(context, ClientContextState(prepared=False))
            self.log.warn(  # noqa: G010 - twisted.logger spells it warn
                "A client TLS context made connections before twisted-sesscache saw it, and "
                "pyOpenSSL no longer lets it change: its connections will not resume. Wrap "
                "the creator before its first connection (an optionsForClientTLS result, "
                "a CertificateOptions, or a creator with getContext())."
            )
            return False
        callbacks = self.runtime.shared
        if callbacks:
            self.runtime.set_session_callbacks(context, new=new_session)
        record(context, ClientContextState(prepared=True, versions=versions, callbacks=callbacks))
        return True


# -- what can be read from Twisted's creators ---------------------------------------


def _verified_hostname(creator: IOpenSSLClientConnectionCreator, hostname: str | None) -> str:
    """``hostname``, checked against (or else read from) the name an ``optionsForClientTLS`` result verifies."""
    verified = hostname_of(creator)
    if hostname is None:
        hostname = verified
    elif verified is not None and ascii_host(hostname) != verified:
        raise ValueError(f"hostname {hostname!r} is not the name {verified!r} that the creator verifies")
    if hostname is None:
        raise ValueError(f"cannot tell which hostname {creator!r} verifies: pass hostname=")
    return hostname


def _context_of(creator: IOpenSSLClientConnectionCreator, options: CertificateOptions | None) -> SSL.Context | None:
    """The context the creator's connections will use, when it can be had before the first one."""
    get_context = getattr(options if options is not None else creator, "getContext", None)
    context = get_context() if get_context is not None else None
    return context if isinstance(context, SSL.Context) else None


__all__ = [
    "CLIENT_CONTEXT_MODE",
    "CLIENT_SESSION_ID_CONTEXT",
    "DEFAULT_TIMEOUT",
    "ClientSessionCache",
    "SessionClientCreator",
    "SessionHTTPSPolicy",
    "SessionKey",
]

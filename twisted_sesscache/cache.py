"""SessionCache: one session-cache configuration, applied to every context it manages.

The object users hold. It mirrors OpenSSL's per-``SSL_CTX`` cache API
(flush, add, remove, statistics) for an application that may serve several
certificates, and fronts the client side; the work is done by the pieces it
is made of: :class:`~twisted_sesscache.server.contexts.ServerContexts`,
:class:`~twisted_sesscache.server.flush.FlushSchedule`,
:class:`~twisted_sesscache.sharing.Sharing` and
:class:`~twisted_sesscache.client.cache.ClientSessionCache`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.web.iweb import IPolicyForHTTPS

from twisted_sesscache._openssl import OpenSSLAccess
from twisted_sesscache._openssl import runtime as openssl_runtime
from twisted_sesscache.client.cache import ClientSessionCache
from twisted_sesscache.clock import LateClock, global_reactor
from twisted_sesscache.config import CacheConfig
from twisted_sesscache.interfaces import ISessionStore
from twisted_sesscache.modes import CacheMode
from twisted_sesscache.server.contexts import ServerContexts
from twisted_sesscache.server.creator import SessionServerCreator
from twisted_sesscache.server.external import ExternalSessions
from twisted_sesscache.server.flush import FlushSchedule
from twisted_sesscache.server.tickets import SharedTicketKeys
from twisted_sesscache.sharing import Sharing
from twisted_sesscache.stats import cache_stats
from twisted_sesscache.tls.connection import WatchedConnection


class SessionCache:
    """Owns the session-cache configuration of a group of ``SSL.Context`` objects.

    Built from keyword arguments (the fields of :class:`CacheConfig`) or from
    a ready ``config``. ``store`` is a URL or an ``ISessionStore``;
    ``store_keys`` the sealing keys (the first seals, all open). ``clock`` is
    the one ``IReactorTime`` the cache uses (default: the global reactor).
    """

    def __init__(
        self,
        mode: CacheMode | str = CacheMode.SERVER,
        *,
        config: CacheConfig | None = None,
        store: str | ISessionStore | None = None,
        store_keys: Sequence[bytes] | None = None,
        clock: IReactorTime | None = None,
        runtime: OpenSSLAccess | None = None,
        **settings: Any,
    ) -> None:
        if config is None:
            keys = tuple(store_keys) if store_keys is not None else None
            config = CacheConfig(mode=mode, store=store, store_keys=keys, **settings)  # type: ignore[arg-type]
        elif settings or store is not None or store_keys is not None:
            raise TypeError("pass either config= or settings, not both")
        self.runtime = runtime or openssl_runtime()
        self.config = config = config.for_runtime(self.runtime)
        self._clock = clock
        self.clock: IReactorTime = LateClock(self._resolve_clock)
        self.sharing = Sharing(config, self.runtime, self.clock) if config.store is not None else None
        self.server = ServerContexts(config, self.runtime, self.sharing)
        self.flushing = FlushSchedule(self.server, self.runtime, self.clock, config.flush_interval or 0.0, self._also_flush)
        self._client: ClientSessionCache | None = None
        self._reports: list[Callable[[], Mapping[str, int]]] = []
        self._started = False

    def use_clock(self, clock: IReactorTime) -> None:
        """Make ``clock`` the cache's one clock, for every part of it; only before ``start``."""
        if self._started:
            raise RuntimeError("the cache has started: its clock can no longer change")
        self._clock = clock

    def _resolve_clock(self) -> IReactorTime:
        if self._clock is None:
            self._clock = global_reactor()
        return self._clock

    # -- settings, as OpenSSL applies them -------------------------------------------

    @property
    def mode(self) -> CacheMode:
        """The mode OpenSSL gets (with ``no-auto-clear`` when the reactor flushes)."""
        return self.config.effective_mode

    @property
    def size(self) -> int | None:
        return self.config.size

    @property
    def timeout(self) -> int:
        return self.config.timeout

    @property
    def flush_interval(self) -> float:
        return self.config.flush_interval or 0.0

    @property
    def session_id_context(self) -> bytes | None:
        return self.config.session_id_context

    @property
    def tickets(self) -> bool:
        """Whether stateless tickets are on (own or shared keys)."""
        return bool(self.config.tickets)

    @property
    def keep_sessions_on_truncation(self) -> bool:
        return self.config.keep_sessions_on_truncation

    @property
    def store(self) -> ISessionStore | None:
        return self.sharing.store if self.sharing is not None else None

    @property
    def external(self) -> ExternalSessions | None:
        return self.sharing.external if self.sharing is not None else None

    @property
    def ticket_keys(self) -> SharedTicketKeys | None:
        return self.sharing.ticket_keys if self.sharing is not None else None

    @property
    def contexts(self) -> list[SSL.Context]:
        return self.server.contexts

    # -- the server side ----------------------------------------------------------------

    def attach(self, context: SSL.Context, session_id_context: bytes | None = None) -> SSL.Context:
        """Apply this cache's settings to ``context`` (once) and manage it from now on."""
        return self.server.attach(context, session_id_context)

    def watch(self, connection: SSL.Connection) -> WatchedConnection:
        """Attach the connection's context and observe its handshake."""
        return self.server.watch(connection)

    def server_context_factory(self, options: Any, alpn: Sequence[bytes] = ()) -> SessionServerCreator:
        """Wrap a ``CertificateOptions`` (or any server connection creator) to use this cache.

        ``alpn``: protocols to negotiate besides those the protocol factory declares.
        """
        return SessionServerCreator(self.server, options, alpn)

    # -- the client side ----------------------------------------------------------------

    @property
    def client(self) -> ClientSessionCache:
        """The client side: sessions this process offers when it connects out."""
        if self._client is None:
            self._client = ClientSessionCache(
                timeout=self.config.timeout,
                keep_sessions_on_truncation=self.config.keep_sessions_on_truncation,
                runtime=self.runtime,
                clock=self.clock,
                shared=self.sharing.client_sessions() if self.sharing is not None else None,
            )
        return self._client

    def client_creator(self, hostname: str, **kwargs: Any) -> IOpenSSLClientConnectionCreator:
        """An ``IOpenSSLClientConnectionCreator`` for ``hostname`` that resumes sessions."""
        return self.client.creator(hostname, **kwargs)

    def https_policy(self, **kwargs: Any) -> IPolicyForHTTPS:
        """An ``IPolicyForHTTPS`` for ``Agent``/treq whose connections resume sessions."""
        return self.client.https_policy(**kwargs)

    # -- OpenSSL's session-cache operations -----------------------------------------------

    def flush(self, now: float | None = None) -> int:
        """SSL_CTX_flush_sessions(3) on every context; returns the sessions removed."""
        return self.flushing.flush(self.clock.seconds() if now is None else now)

    def add(self, session: SSL.Session, context: SSL.Context | None = None) -> bool:
        """SSL_CTX_add_session(3): false when this very session object is already cached.

        A different object with the same session ID replaces the cached one.
        Without ``context``, the session goes to every managed context.
        """
        return self.server.each(self.runtime.add_session, session, context)

    def remove(self, session: SSL.Session, context: SSL.Context | None = None) -> bool:
        """SSL_CTX_remove_session(3): false when the session was not cached."""
        return self.server.each(self.runtime.remove_session, session, context)

    def stats(self) -> dict[str, Any]:
        """OpenSSL's SSL_CTX_sess_* counters summed over the contexts, plus flush and store counts.

        Under the bundled runtime, only what handshakes show is counted; the
        rest is ``None`` rather than a made-up zero.
        """
        summary = cache_stats(self.config, self.server, self.flushing, self.sharing, self._client)
        for report in self._reports:
            summary.update(report())
        return summary

    def report(self, counters: Callable[[], Mapping[str, int]]) -> None:
        """Add the counters of a listener built on this cache (handshake failures, the proxy's) to ``stats()``."""
        self._reports.append(counters)

    # -- scheduling -------------------------------------------------------------------------

    def start(self, clock: IReactorTime | None = None) -> Deferred[None] | None:
        """Flush expired sessions every ``flush_interval`` seconds on the clock, keep ticket keys fresh.

        ``clock`` replaces the cache's clock, for every part of it, when given
        before the cache started. Returns a Deferred that fires once shared
        ticket keys are in hand, if any.
        """
        if self._started:
            return None
        if clock is not None:
            self.use_clock(clock)
        self._started = True
        ready = self.sharing.start() if self.sharing is not None else None
        self.flushing.start()
        return ready

    def stop(self) -> None:
        self._started = False
        if self.sharing is not None:
            self.sharing.stop()
        self.flushing.stop()

    def _also_flush(self, now: int) -> None:
        """What each flush tick does besides OpenSSL's flush: client sessions, in-process store."""
        if self._client is not None:
            self._client.flush(now)
        if self.sharing is not None:
            self.sharing.expire()


__all__ = ["SessionCache"]

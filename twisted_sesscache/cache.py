"""SessionCache: one set of session-cache settings applied to every context it manages."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from twisted.internet.defer import Deferred

from twisted_sesscache.tls.clienthello import ClientHello
from twisted_sesscache.tls.connection import WatchedConnection
from twisted_sesscache.server.external import ExternalSessions
from twisted_sesscache.modes import CacheMode
from twisted_sesscache._openssl import COUNTERS, OpenSSLAccess, runtime as openssl_runtime
from twisted_sesscache.exceptions import NeedsSharedOpenSSL
from twisted_sesscache.sealing import KEY_BYTES, Sealer
from twisted_sesscache.interfaces import ISessionStore
from twisted_sesscache.stores.memory import MemoryStore
from twisted_sesscache.server.tickets import SharedTicketKeys

DEFAULT_SIZE = 20480  # SSL_SESSION_CACHE_MAX_SIZE_DEFAULT
DEFAULT_TIMEOUT = 300
SESSION_ID_CONTEXT_MAX = 32  # SSL_MAX_SID_CTX_LENGTH

if TYPE_CHECKING:
    from twisted_sesscache.client.cache import ClientSessionCache

# A scheduled flush catches up on at most this many seconds (a slice each):
# after a long pause or a clock jump, the first slice takes the rest at once.
MAX_FLUSH_SLICES = 3600
# Records an in-process store drops per tick at most (a few milliseconds' work).
STORE_EXPIRY_BUDGET = 1000

# Counters that can be observed from handshakes when OpenSSL's own are out of reach.
OBSERVED = ("accept", "accept_good", "hits", "misses")


class SessionCache:
    """Owns the session-cache configuration of a group of ``SSL.Context`` objects.

    Settings apply to every attached context, statistics sum over them, and a
    flush covers them all, mirroring OpenSSL's per-``SSL_CTX`` cache API for an
    application that may serve several certificates.
    """

    log = Logger()

    def __init__(
        self,
        mode: CacheMode | str = CacheMode.SERVER,
        *,
        size: int | None = None,
        timeout: int = DEFAULT_TIMEOUT,
        flush_interval: float = 0,
        session_id_context: bytes | str | None = None,
        tickets: bool | str = False,
        ticket_key_rotation: float = 3600,
        keep_sessions_on_truncation: bool = True,
        store: ISessionStore | None = None,
        store_keys: list[bytes] | None = None,
        store_timeout: float = 0.05,
        runtime: OpenSSLAccess | None = None,
    ) -> None:
        runtime = runtime or openssl_runtime()
        mode = CacheMode.parse(mode) if isinstance(mode, str) else CacheMode(mode)
        if size is not None and size < 0:
            raise ValueError(f"session cache size must be 0 (no limit) or more, not {size}")
        if timeout <= 0:
            raise ValueError(f"session timeout must be a positive number of seconds, not {timeout}")
        if flush_interval < 0:
            raise ValueError(f"flush interval must be 0 (OpenSSL's automatic flush) or more, not {flush_interval}")
        if isinstance(session_id_context, str):
            session_id_context = session_id_context.encode("utf-8")
        if session_id_context is not None and not 0 < len(session_id_context) <= SESSION_ID_CONTEXT_MAX:
            raise ValueError(f"session-ID context must be 1 to {SESSION_ID_CONTEXT_MAX} bytes long")
        if not runtime.shared:
            if size is not None:
                raise NeedsSharedOpenSSL("A session cache size limit", runtime.version)
            if flush_interval:
                raise NeedsSharedOpenSSL("A scheduled flush of expired sessions", runtime.version)
        if store is not None and not store_keys:
            if not isinstance(store, MemoryStore):
                raise ValueError(
                    "a shared session store needs a sealing key that every process shares "
                    "(store_keys=[32 bytes], --store-key-file)"
                )
            store_keys = [os.urandom(KEY_BYTES)]  # never leaves the process
        if tickets not in (True, False, "shared"):
            raise ValueError(f"tickets must be true, false or 'shared', not {tickets!r}")
        if tickets == "shared":
            if store is None:
                raise ValueError("shared ticket keys need a store (store=..., --store URL)")
            if not runtime.shared:
                raise NeedsSharedOpenSSL("Shared TLS ticket keys", runtime.version)
        if store_timeout <= 0:
            raise ValueError(f"store timeout must be a positive number of seconds, not {store_timeout}")
        if flush_interval:
            # The reactor flushes; OpenSSL's flush every 255 sessions would stall it unplanned.
            mode |= CacheMode.NO_AUTO_CLEAR
        self.mode = mode
        self.size = size
        self.timeout = timeout
        self.flush_interval = flush_interval
        self.session_id_context = session_id_context
        self.tickets = bool(tickets)
        self.keep_sessions_on_truncation = keep_sessions_on_truncation
        self.runtime = runtime
        self.store = store
        self.store_timeout = store_timeout
        self.sealer = Sealer(store_keys) if store_keys else None
        self.external: ExternalSessions | None = None
        if store is not None and self.sealer is not None and runtime.shared:
            self.external = ExternalSessions(store, self.sealer, runtime, lookup_timeout=store_timeout)
        self.ticket_keys: SharedTicketKeys | None = None
        if tickets == "shared" and store is not None and self.sealer is not None:
            self.ticket_keys = SharedTicketKeys(store, self.sealer, rotation=ticket_key_rotation, lifetime=timeout)
        self.contexts: list[SSL.Context] = []
        self._sid_contexts: dict[int, bytes] = {}
        self._tls13: dict[int, bool] = {}
        self._observed = dict.fromkeys(OBSERVED, 0)
        self._flushes = 0
        self._flushed = 0
        self._loop: LoopingCall | None = None
        self._flushed_until: int | None = None
        self._started = False
        self._client: ClientSessionCache | None = None

    # -- contexts ----------------------------------------------------------

    def attach(self, context: SSL.Context, session_id_context: bytes | None = None) -> SSL.Context:
        """Apply this cache's settings to ``context`` (once) and manage it from now on.

        ``session_id_context`` is used when the cache has none of its own.
        """
        if id(context) in self._sid_contexts:
            return context
        context.set_session_cache_mode(int(self.mode))
        context.set_timeout(self.timeout)
        sid_context = self.session_id_context or session_id_context
        if sid_context:
            context.set_session_id(sid_context)
        self.runtime.allow_tickets(context, self.tickets)
        if self.size is not None:
            self.runtime.set_cache_size(context, self.size)
        if self.ticket_keys is not None:
            self.runtime.set_ticket_keys(context, self.ticket_keys)
        self.contexts.append(context)
        self._sid_contexts[id(context)] = sid_context or b""
        if self.runtime.shared:
            self._tls13[id(context)] = self.runtime.allows_tls13(context)
        if self.external is not None and self.mode & CacheMode.SERVER:
            if not sid_context:
                raise ValueError("a shared session store needs a session-ID context (session_id_context=...)")
            self.external.wire(context, sid_context)
        elif self.store is not None and not self.runtime.shared and self.mode & CacheMode.SERVER:
            self.log.warn(
                "The {runtime} runtime cannot give OpenSSL an external session store: "
                "server sessions stay in this process (docs/runtimes.md)",
                runtime=self.runtime.name,
            )
        return context

    def server_context_factory(self, options: Any) -> Any:
        """Wrap a ``CertificateOptions`` (or any server connection creator) to use this cache."""
        from twisted_sesscache.server.creator import SessionServerCreator

        return SessionServerCreator(self, options)

    @property
    def client(self) -> ClientSessionCache:
        """The client side: sessions this process offers when it connects out."""
        if self._client is None:
            from twisted_sesscache.client.cache import ClientSessionCache

            self._client = ClientSessionCache(self)
        return self._client

    def client_creator(self, hostname: str, **kwargs: Any) -> Any:
        """An ``IOpenSSLClientConnectionCreator`` for ``hostname`` that resumes sessions."""
        return self.client.creator(hostname, **kwargs)

    def https_policy(self, **kwargs: Any) -> Any:
        """An ``IPolicyForHTTPS`` for ``Agent``/treq whose connections resume sessions."""
        return self.client.https_policy(**kwargs)

    def watch(self, connection: SSL.Connection) -> WatchedConnection:
        """Attach the connection's context and observe its handshake."""
        self.attach(connection.get_context())
        return WatchedConnection(
            connection,
            self,
            keep_session_on_eof=self.keep_sessions_on_truncation,
            # The hello is read for the store's prefetch, and for counting misses
            # where OpenSSL's own counters are out of reach; otherwise it costs for nothing.
            read_hello=self.external is not None or not self.runtime.shared,
            runtime=self.runtime,
        )

    # -- handshake observer ------------------------------------------------

    def client_hello(self, connection: WatchedConnection, hello: ClientHello) -> Deferred[None] | None:
        if self.external is None:
            return None
        context = connection.get_context()
        return self.external.prefetch(
            connection.connection,
            self._sid_contexts.get(id(context), b""),
            hello,
            tls13=self._tls13.get(id(context), True),
        )

    def handshake_started(self, connection: WatchedConnection) -> None:
        self._observed["accept"] += 1

    def handshake_done(self, connection: WatchedConnection) -> None:
        self._observed["accept_good"] += 1
        if connection.resumed:
            self._observed["hits"] += 1
        elif connection.hello is not None and _offered_session(connection):
            self._observed["misses"] += 1
        if self.external is not None:
            self.external.forget(connection.connection)

    def after_read(self, connection: WatchedConnection) -> None:
        pass

    # -- OpenSSL's session-cache operations ----------------------------------

    def flush(self, now: float | None = None) -> int:
        """SSL_CTX_flush_sessions(3) on every context; returns the sessions removed."""
        self._flushes += 1
        removed = self._flush_until(int(time.time() if now is None else now))
        if removed:
            self.log.info("Flushed {removed} expired TLS sessions", removed=removed)
        return removed

    def _flush_until(self, moment: int) -> int:
        removed = 0
        for context in self.contexts:
            before = self.runtime.counters(context)["number"]
            self.runtime.flush(context, moment)
            removed += before - self.runtime.counters(context)["number"]
        self._flushed += removed
        return removed

    def add(self, session: SSL.Session, context: SSL.Context | None = None) -> bool:
        """SSL_CTX_add_session(3): false when this very session object is already cached.

        A different object with the same session ID replaces the cached one.
        Without ``context``, the session goes to every managed context.
        """
        return self._each_context("add_session", session, context)

    def remove(self, session: SSL.Session, context: SSL.Context | None = None) -> bool:
        """SSL_CTX_remove_session(3): false when the session was not cached."""
        return self._each_context("remove_session", session, context)

    def _each_context(self, operation: str, session: SSL.Session, context: SSL.Context | None) -> bool:
        targets = [context] if context is not None else self.contexts
        if not targets:
            raise ValueError("no context is attached to this cache yet")
        call = getattr(self.runtime, operation)
        results = [call(target, session) for target in targets]
        return any(results)

    # -- statistics ------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """OpenSSL's SSL_CTX_sess_* counters summed over the contexts, plus flush counts.

        Under the bundled runtime, only what handshakes show is counted; the
        rest is ``None`` rather than a made-up zero.
        """
        summary: dict[str, Any] = {
            "runtime": self.runtime.name,
            "mode": self.mode.spelled(),
            "size_limit": DEFAULT_SIZE if self.size is None else self.size,
            "timeout": self.timeout,
            "contexts": len(self.contexts),
        }
        if self.runtime.shared:
            totals = dict.fromkeys(COUNTERS, 0)
            for context in self.contexts:
                for name, value in self.runtime.counters(context).items():
                    totals[name] += value
            summary.update(totals)
        else:
            summary.update(dict.fromkeys(COUNTERS))
            summary.update(self._observed)
        summary["flushes"] = self._flushes
        summary["flushed"] = self._flushed
        if self.store is not None:
            summary["store"] = type(self.store).__name__
            summary["store_errors"] = getattr(self.store, "errors", 0)
            if self.external is not None:
                summary.update(self.external.counts)
        if self._client is not None:
            summary["client"] = self._client.stats()
        return summary

    # -- scheduling ------------------------------------------------------------

    def start(self, clock: IReactorTime | None = None) -> Deferred[None] | None:
        """Flush expired sessions every ``flush_interval`` seconds on the reactor, keep ticket keys fresh.

        Returns a Deferred that fires once shared ticket keys are in hand, if any.
        """
        if self._started:
            return None
        self._started = True
        ready = self.ticket_keys.start() if self.ticket_keys is not None else None
        if self.flush_interval:
            self._start_flush_loop(clock)
        return ready

    def _start_flush_loop(self, clock: IReactorTime | None) -> None:
        self._loop = LoopingCall(self._scheduled_flush)
        if clock is not None:
            self._loop.clock = clock
        self._loop.start(self.flush_interval, now=False)

    def _scheduled_flush(self) -> None:
        """One tick of the flush loop: a failure is logged, and the loop goes on.

        OpenSSL keeps its cache ordered by expiry, so a flush costs in
        proportion to what it removes. The tick removes what expired since the
        last one a second at a time, one second per reactor turn: a burst of
        expiries never holds the reactor for longer than one second's worth
        (measured in docs/benchmarks.md).
        """
        assert self._loop is not None
        clock = self._loop.clock
        now = int(clock.seconds())
        try:
            if self._client is not None:
                self._client.flush(now)
            expire = getattr(self.store, "expire", None)  # a store whose records no server expires
            if expire is not None:
                expire(budget=STORE_EXPIRY_BUDGET)
        except Exception:
            self.log.failure("Scheduled flush of client sessions or store records failed")
        if not (self.contexts and self.runtime.shared):
            return
        # The first tick looks back as far as slices go; later ticks from where the last one ended.
        start = max(self._flushed_until or 0, now - MAX_FLUSH_SLICES)
        self._flushed_until = now
        self._flushes += 1
        self._flush_slices(iter(range(start + 1, now + 1)), clock, 0)

    def _flush_slices(self, moments: Iterator[int], clock: IReactorTime, removed: int) -> None:
        try:
            moment = next(moments, None)
            if moment is not None:
                removed += self._flush_until(moment)
        except Exception:
            self.log.failure("Scheduled session flush failed")
            return
        if moment is not None:
            clock.callLater(0, self._flush_slices, moments, clock, removed)
        elif removed:
            self.log.info("Flushed {removed} expired TLS sessions", removed=removed)

    def stop(self) -> None:
        self._started = False
        if self.ticket_keys is not None:
            self.ticket_keys.stop()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None


def _offered_session(connection: WatchedConnection) -> bool:
    """Whether the client asked to resume, judged by the version actually negotiated.

    In TLS 1.3 the legacy session ID is random (middlebox compatibility), so
    only PSK identities count there.
    """
    hello = connection.hello
    if hello is None:
        return False
    if connection.get_protocol_version_name() == "TLSv1.3":
        return bool(hello.psk_identities)
    return bool(hello.session_id) or hello.ticket

"""The server contexts a cache manages: settings applied once, handshakes observed, add/remove.

OpenSSL's session cache lives in each ``SSL_CTX``. A cache may serve several
contexts (several certificates, several listeners); this object applies the
cache's settings to each one the first time it is seen, watches the
connections made from them, and counts what handshakes show where OpenSSL's
own counters are out of reach (the bundled runtime).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from twisted_sesscache._openssl import COUNTERS, OpenSSLAccess
from twisted_sesscache.config import CacheConfig, Tickets
from twisted_sesscache.exceptions import ConfigurationError
from twisted_sesscache.modes import CacheMode
from twisted_sesscache.tls.clienthello import ClientHello
from twisted_sesscache.tls.connection import WatchedConnection

if TYPE_CHECKING:
    from twisted_sesscache.server.external import ExternalSessions
    from twisted_sesscache.sharing import Sharing

# Counters that can be observed from handshakes when OpenSSL's own are out of reach.
OBSERVED = ("accept", "accept_good", "hits", "misses")


class ServerContexts:
    """Applies one configuration to every context it is given, and observes their handshakes."""

    log = Logger()

    def __init__(self, config: CacheConfig, runtime: OpenSSLAccess, sharing: Sharing | None) -> None:
        self.config = config
        self.runtime = runtime
        self.sharing = sharing
        self.contexts: list[SSL.Context] = []
        self._sid_contexts: dict[int, bytes] = {}
        self._tls13: dict[int, bool] = {}
        self.observed = dict.fromkeys(OBSERVED, 0)

    def attach(self, context: SSL.Context, session_id_context: bytes | None = None) -> SSL.Context:
        """Apply the settings to ``context`` (once) and manage it from now on.

        ``session_id_context`` is used when the configuration has none of its own.
        """
        if id(context) in self._sid_contexts:
            return context
        config, runtime = self.config, self.runtime
        context.set_session_cache_mode(int(config.effective_mode))
        context.set_timeout(config.timeout)
        sid_context = config.session_id_context or session_id_context
        if sid_context:
            context.set_session_id(sid_context)
        runtime.allow_tickets(context, bool(config.tickets))
        if config.size is not None:
            runtime.set_cache_size(context, config.size)
        self.contexts.append(context)
        self._sid_contexts[id(context)] = sid_context or b""
        if runtime.shared:
            self._tls13[id(context)] = runtime.allows_tls13(context)
        self._wire_store(context, sid_context)
        return context

    def _wire_store(self, context: SSL.Context, sid_context: bytes | None) -> None:
        sharing = self.sharing
        if sharing is None:
            return
        if sharing.ticket_keys is not None and self.config.tickets is Tickets.SHARED:
            self.runtime.set_ticket_keys(context, sharing.ticket_keys)
        if not self.config.mode & CacheMode.SERVER:
            return
        if sharing.external is not None or sharing.ticket_keys is not None:
            # Processes resume each other's sessions only under one session-ID context.
            if not sid_context:
                raise ConfigurationError(
                    "session_id_context", "a shared session store needs a session-ID context (session_id_context=...)"
                )
            if sharing.external is not None:
                sharing.external.wire(context, sid_context)
        elif not self.runtime.shared:
            self.log.warn(
                "The {runtime} runtime cannot give OpenSSL an external session store: server sessions "
                "stay in this process (install pyOpenSSL on the system libssl to share them)",
                runtime=self.runtime.name,
            )

    def session_id_context(self, context: SSL.Context) -> bytes:
        return self._sid_contexts.get(id(context), b"")

    def watch(self, connection: SSL.Connection, session_id_context: bytes | None = None) -> WatchedConnection:
        """Attach the connection's context (see :meth:`attach`) and observe its handshake."""
        self.attach(connection.get_context(), session_id_context)
        return WatchedConnection(
            connection,
            self,
            keep_session_on_eof=self.config.keep_sessions_on_truncation,
            read_hello=self._read_hello,
            runtime=self.runtime,
        )

    @functools.cached_property
    def _read_hello(self) -> bool:
        """Read for the prefetch from a store that answers later, and to count misses where
        OpenSSL's own counters are out of reach; otherwise it costs for nothing."""
        external = self._external()
        return not self.runtime.shared or (external is not None and not external.synchronous)

    def _external(self) -> ExternalSessions | None:
        return self.sharing.external if self.sharing is not None else None

    # -- HandshakeObserver ---------------------------------------------------------

    watches_reads = False  # a server has nothing to learn from reads after the handshake

    def client_hello(self, connection: WatchedConnection, hello: ClientHello) -> Deferred[None] | None:
        external = self._external()
        if external is None:
            return None
        context = connection.get_context()
        return external.prefetch(
            connection.connection,
            self.session_id_context(context),
            hello,
            tls13=self._tls13.get(id(context), True),
        )

    def holds_session(self, connection: WatchedConnection, session_id: bytes) -> bool:
        external = self._external()
        return external is not None and external.holds(connection.get_context(), session_id)

    def handshake_started(self, connection: WatchedConnection) -> None:
        self.observed["accept"] += 1

    def handshake_done(self, connection: WatchedConnection) -> None:
        self.observed["accept_good"] += 1
        if connection.resumed:
            self.observed["hits"] += 1
        elif connection.hello is not None and _offered_session(connection):
            self.observed["misses"] += 1
        external = self._external()
        if external is not None:
            external.forget(connection.connection)

    def after_read(self, connection: WatchedConnection) -> None:
        pass

    # -- SSL_CTX_add_session(3) and SSL_CTX_remove_session(3) ----------------------

    def each(
        self, operation: Callable[[SSL.Context, SSL.Session], bool], session: SSL.Session, context: SSL.Context | None
    ) -> bool:
        """``operation`` on ``context``, or on every managed context; true if any said true."""
        targets = [context] if context is not None else self.contexts
        if not targets:
            raise ValueError("no context is attached to this cache yet")
        return any([operation(target, session) for target in targets])

    def counters(self) -> dict[str, int]:
        """OpenSSL's SSL_CTX_sess_* statistics summed over the contexts (shared runtime)."""
        totals = dict.fromkeys(COUNTERS, 0)
        for context in self.contexts:
            for name, value in self.runtime.counters(context).items():
                totals[name] += value
        return totals

    def number(self) -> int:
        """Sessions in all the managed contexts' caches right now."""
        return sum(self.runtime.counters(context)["number"] for context in self.contexts)


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


__all__ = ["OBSERVED", "ServerContexts"]

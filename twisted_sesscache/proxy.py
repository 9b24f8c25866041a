"""The TLS-terminating proxy behind ``twistd sesscache --upstream``.

Each accepted TLS connection gets its own connection to the upstream
endpoint once its handshake has completed (a port scan or a client that never
finishes a handshake costs no backend connection), and the decrypted bytes are
relayed both ways. The two transports are registered as each other's
producers, so a slow reader on either leg pauses the other instead of letting
this process buffer without bound. What the upstream leg does is passed on:
a clean close as ``close_notify``, a reset or a failed TLS leg as a close
without ``close_notify``, which the client sees as truncation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from twisted.application import service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.internet.error import ConnectingCancelledError, ConnectionDone
from twisted.internet.interfaces import (
    ITCPTransport,
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_sesscache.failures import RateLimitedLog, failure_reason, peer_text
from twisted_sesscache.handshakes import HandshakeFailures, HandshakeGuardFactory
from twisted_sesscache.proxy_config import (
    HANDSHAKE_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_EARLY_DATA,
    SHUTDOWN_TIMEOUT,
    ProxySettings,
)
from twisted_sesscache.proxy_protocol import HeaderFirstEndpoint, header
from twisted_sesscache.shutdown import Drain


@implementer(IPushProducer)
class FlowControl:
    """One leg's transport as the other leg's producer: it may be paused and resumed, not stopped.

    A transport that loses its connection calls ``stopProducing`` on its
    producer, and a TCP transport's ``stopProducing`` closes it at once. For
    the accepted TLS leg that would cut TCP under TLS: no ``close_notify``
    read from the client, so the close looks truncated to OpenSSL. Closing is
    left to the protocols' ``connectionLost``, which closes the other leg the
    orderly way.
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


def close_orderly(transport: Any) -> None:
    """Close a leg with ``close_notify`` (TLS sends it only once no producer is registered)."""
    transport.unregisterProducer()
    transport.resumeProducing()  # the peer's close_notify must be read: reading may be paused
    transport.loseConnection()


def close_truncated(transport: Any) -> None:
    """Close a TLS leg after the bytes already written, without ``close_notify``: the peer sees truncation.

    ``abortConnection`` would also drop what is still in the write buffer, the
    part of the body that did arrive; marking the TLS shutdown as done makes
    the orderly close skip the alert instead (what nginx does after an upstream
    error). Without a TLS handle, an abort is all there is.
    """
    handle = transport.getHandle() if hasattr(transport, "getHandle") else None
    if handle is None or not hasattr(handle, "set_shutdown"):
        transport.abortConnection()
        return
    from OpenSSL import SSL

    handle.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
    close_orderly(transport)


def upstream_endpoint(reactor: Any, options: Mapping[str, Any]) -> IStreamClientEndpoint:
    """The endpoint each proxied connection connects to (TLS, with ``upstreamCreator``, on top)."""
    endpoint = clientFromString(reactor, options["upstream"])
    creator = options.get("upstreamCreator")
    return wrapClientTLS(creator, endpoint) if creator is not None else endpoint


@implementer(IHandshakeListener)
class ProxyServer(Protocol):
    """The accepted leg: connects upstream once its TLS handshake completes, holding early bytes meanwhile."""

    factory: ProxyFactory

    def __init__(self, proxy: ProxyFactory) -> None:
        self.proxy = proxy
        self.peer: ProxyClient | None = None
        self.handshake_done = False
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._paused_for_upstream = False
        self._connecting: Deferred[ProxyClient] | None = None
        self._closed = False
        self._upstreamGone = False
        self.last_activity = 0.0
        self._idle_call: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.proxy.drain.add(self)

    def handshakeCompleted(self) -> None:
        if self._closed or self.handshake_done:
            return
        self.handshake_done = True
        self.touch()
        self._watch_idle(self.proxy.idle_timeout)
        self._hold_if_full()
        connecting = self._connecting = self.proxy.connect_upstream(self)
        connecting.addCallbacks(self._upstreamConnected, self._upstreamFailed)

    def _hold_if_full(self) -> None:
        if not self._paused_for_upstream and self._pending_size >= self.proxy.max_early_data:
            self._paused_for_upstream = True
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def _upstreamConnected(self, client: ProxyClient) -> None:
        self._connecting = None
        if self._closed:
            client.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.peer = client
        # Each side pauses the other when its own write buffer fills up.
        self.transport.registerProducer(FlowControl(client.transport), True)  # type: ignore[union-attr]
        client.transport.registerProducer(FlowControl(self.transport), True)  # type: ignore[union-attr]
        if self._pending:
            client.transport.writeSequence(self._pending)  # type: ignore[union-attr]
            self._pending, self._pending_size = [], 0
        if self._paused_for_upstream:
            self._paused_for_upstream = False
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def _upstreamFailed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError, ConnectingCancelledError) or self._closed:
            return
        self.proxy.upstream_failed("connect", self.transport.getPeer(), failure)  # type: ignore[union-attr]
        self.transport.abortConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.touch()
        if self.peer is not None:
            self.peer.transport.write(data)  # type: ignore[union-attr]
        elif not self._upstreamGone:
            self._pending.append(data)
            self._pending_size += len(data)
            self._hold_if_full()

    def touch(self) -> None:
        """Traffic one way or the other: the connection is not idle."""
        self.last_activity = self.proxy.clock.seconds()

    def _watch_idle(self, delay: float | None) -> None:
        if delay is not None and not self._closed:
            self._idle_call = self.proxy.clock.callLater(delay, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_call = None
        timeout = self.proxy.idle_timeout
        assert timeout is not None
        quiet = self.proxy.clock.seconds() - self.last_activity
        if quiet < timeout:
            self._watch_idle(timeout - quiet)
            return
        self.proxy.log.debug("Closing {peer}: idle both ways for {seconds:g} s",
                             peer=peer_text(self.transport.getPeer()), seconds=timeout)  # type: ignore[union-attr]
        self.close()

    def close(self) -> None:
        """Close both legs the orderly way (idle both ways: nothing is in flight)."""
        if self._closed:
            return
        if self._connecting is not None:
            self._connecting.cancel()
        peer = self.peer
        if peer is not None and peer.transport is not None:
            close_orderly(peer.transport)  # its connectionLost then closes this leg
        else:
            close_orderly(self.transport)

    def cut(self) -> None:
        """The end of a shutdown's wait: what the client got may be incomplete, so no ``close_notify``."""
        if self._closed:
            return
        if self._connecting is not None:
            self._connecting.cancel()
        close_truncated(self.transport)
        peer = self.peer
        if peer is not None and peer.transport is not None:
            close_orderly(peer.transport)

    def upstreamLost(self, client: ProxyClient, reason: Failure = connectionDone) -> None:
        """The upstream leg closed: a clean close becomes ``close_notify``, anything else truncation."""
        if self.peer is client:
            self.peer = None
        self._upstreamGone = True
        self._pending, self._pending_size = [], 0
        if self._closed or self.transport is None:
            return
        if reason.check(ConnectionDone):
            close_orderly(self.transport)
            return
        kind = "tls" if client.tls and not client.handshake_done else "reset"
        self.proxy.upstream_failed(kind, self.transport.getPeer(), reason)
        close_truncated(self.transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        if self._connecting is not None:
            self._connecting.cancel()
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.transport.unregisterProducer()  # type: ignore[union-attr]
            peer.transport.loseConnection()  # type: ignore[union-attr]
        self.proxy.drain.discard(self)


@implementer(IHandshakeListener)
class ProxyClient(Protocol):
    """The upstream leg: its bytes go back to the accepted connection."""

    def __init__(self, server: ProxyServer, tls: bool = False) -> None:
        self.server = server
        self.tls = tls
        self.handshake_done = False

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def dataReceived(self, data: bytes) -> None:
        self.server.touch()
        self.server.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.server.upstreamLost(self, reason)


class _UpstreamFactory(Factory):
    """``connectProtocol``'s one-shot factory, without its "Starting factory" line per connection."""

    noisy = False

    def __init__(self, protocol: ProxyClient) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> ProxyClient:
        return self._protocol


class ProxyFactory(Factory):
    """Builds one :class:`ProxyServer` per accepted connection; ``name`` is for logs.

    ``upstream`` is the backend's endpoint; with ``upstream_creator`` the leg
    speaks TLS on top of it (and, with ``upstream_proxy_protocol`` "v1" or
    "v2", the PROXY header goes first, below TLS). Unless ``guard`` is False
    (the listener's TLS layer has its own :class:`HandshakeGuardFactory`), each
    protocol is wrapped in a guard that drops handshakes not completed after
    ``handshake_timeout`` seconds and counts failures in ``handshakes``.
    """

    noisy = False
    log = Logger(namespace="twisted_sesscache.proxy")
    UPSTREAM_COUNTERS = {"connect": "upstream_connect_failures", "tls": "upstream_tls_failures",
                         "reset": "upstream_resets"}

    def __init__(
        self,
        upstream: IStreamClientEndpoint,
        name: str = "upstream",
        *,
        upstream_creator: IOpenSSLClientConnectionCreator | None = None,
        upstream_proxy_protocol: str | None = None,
        handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
        idle_timeout: float | None = IDLE_TIMEOUT,
        max_early_data: int = MAX_EARLY_DATA,
        shutdown_timeout: float = SHUTDOWN_TIMEOUT,
        handshakes: HandshakeFailures | None = None,
        guard: bool = True,
        clock: IReactorTime | None = None,
    ) -> None:
        ProxySettings(handshake_timeout=handshake_timeout, idle_timeout=idle_timeout,  # checks them
                      shutdown_timeout=shutdown_timeout, max_early_data=max_early_data,
                      upstream_proxy_protocol=upstream_proxy_protocol)
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.clock: IReactorTime = clock
        self.upstream = upstream
        self.name = name
        self.upstream_creator = upstream_creator
        self.upstream_proxy_protocol = upstream_proxy_protocol
        self.idle_timeout = idle_timeout
        self.max_early_data = max_early_data
        self.shutdown_timeout = shutdown_timeout
        self.handshakes = handshakes if handshakes is not None else HandshakeFailures(self.clock)
        self.guard = HandshakeGuardFactory(self, self.handshakes, timeout=handshake_timeout, clock=self.clock) \
            if guard else None
        self.counts = {counter: 0 for counter in self.UPSTREAM_COUNTERS.values()}
        self._upstream_log = RateLimitedLog(self.log, self.clock, "upstream failures", level=LogLevel.warn)
        self.drain: Drain[ProxyServer] = Drain(self.clock, self.log, "proxied connections")

    def buildProtocol(self, addr: IAddress | None) -> Any:
        protocol = ProxyServer(self)
        protocol.factory = self
        return self.guard.wrap(protocol) if self.guard is not None else protocol

    def stats(self) -> dict[str, int]:
        """The counters for the stats page: handshake failures and timeouts, upstream failures, accepted connections still open."""
        return {**self.handshakes.counts, **self.counts, "open_connections": len(self.drain)}

    def connect_upstream(self, server: ProxyServer) -> Deferred[ProxyClient]:
        """Connect a new upstream leg for ``server`` (the PROXY header, then TLS, as configured)."""
        endpoint = self.upstream
        if self.upstream_proxy_protocol is not None:
            transport: Any = server.transport
            first = header(self.upstream_proxy_protocol, transport.getPeer(), transport.getHost())
            endpoint = HeaderFirstEndpoint(endpoint, first)
        if self.upstream_creator is not None:
            endpoint = wrapClientTLS(self.upstream_creator, endpoint)
        client = ProxyClient(server, tls=self.upstream_creator is not None)
        return cast("Deferred[ProxyClient]", endpoint.connect(_UpstreamFactory(client)))

    def upstream_failed(self, kind: str, peer: IAddress, reason: Failure) -> None:
        """Count and log (rate-limited) an upstream leg that could not connect, failed TLS or was reset."""
        self.counts[self.UPSTREAM_COUNTERS[kind]] += 1
        what = {"connect": "cannot reach {upstream}", "tls": "TLS with {upstream} failed",
                "reset": "{upstream} reset or closed without a clean end"}[kind]
        self._upstream_log.emit(f"Proxying {{peer}}: {what}: {{reason}}", peer=peer_text(peer),
                                upstream=self.name, reason=failure_reason(reason))

    def shutdown(self, timeout: float | None = None) -> Deferred[None]:
        """Stop new work and let proxied connections finish for ``timeout`` s, then cut the rest.

        The listening port is stopped by its own service; handshakes still in
        progress are dropped now, since they have nothing in flight yet.
        """
        if self.guard is not None:
            self.guard.abort_handshakes()
        else:
            for server in self.drain.members():
                if not server.handshake_done and server.transport is not None:
                    _abort(server)
        self.handshakes.flush()
        self._upstream_log.flush()
        return self.drain.wait(self.shutdown_timeout if timeout is None else timeout,
                               close=lambda server: server.cut(),
                               abort=_abort)


class ProxyShutdownService(service.Service):
    """Lets proxied connections finish when the application stops (SIGTERM): see ``ProxyFactory.shutdown``.

    Put it beside the listener's service: stopping the listener stops
    accepting, stopping this one waits for the connections already accepted.
    """

    def __init__(self, factory: ProxyFactory, timeout: float | None = None) -> None:
        self.factory = factory
        self.timeout = timeout

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.factory.shutdown(self.timeout)


def proxy_factory(reactor: Any, options: Mapping[str, Any]) -> ProxyFactory:
    """The proxy ``twistd sesscache --upstream`` runs: ``upstream``, ``upstreamCreator``, ``settings``
    (a :class:`ProxySettings`) and ``handshakeFailures`` (the counters shared with the stats page)."""
    settings: ProxySettings = options.get("settings") or ProxySettings()
    return ProxyFactory(
        clientFromString(reactor, options["upstream"]),
        f"upstream {options['upstream']}",
        upstream_creator=options.get("upstreamCreator"),
        handshakes=options.get("handshakeFailures"),
        clock=reactor,
        **settings.arguments(),
    )



def _abort(server: ProxyServer) -> None:
    """Drop the accepted leg at once (its TLS transport offers abortConnection)."""
    if server.transport is not None:
        cast(ITCPTransport, server.transport).abortConnection()

__all__ = [
    "IDLE_TIMEOUT", "MAX_EARLY_DATA", "SHUTDOWN_TIMEOUT", "FlowControl", "ProxyClient", "ProxyFactory",
    "ProxyServer", "ProxyShutdownService", "close_orderly", "close_truncated", "proxy_factory", "upstream_endpoint",
]

"""The TLS-terminating proxy behind ``twistd sesscache --upstream``.

Each accepted (TLS) connection gets its own connection to the upstream
endpoint, and the decrypted bytes are relayed both ways. The two transports
are registered as each other's producers, so a slow reader on either leg
pauses the other instead of letting this process buffer without bound.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import clientFromString, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IAddress, IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer


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


def upstream_endpoint(reactor: Any, options: Mapping[str, Any]) -> IStreamClientEndpoint:
    """The endpoint each proxied connection connects to.

    ``options`` are the ``twistd sesscache`` options: ``upstream`` (a client
    endpoint string) and, with ``--upstream-tls``, the ``upstreamCreator``
    that verifies the backend and, in client cache mode, resumes its sessions.
    """
    endpoint = clientFromString(reactor, options["upstream"])
    creator = options.get("upstreamCreator")
    return wrapClientTLS(creator, endpoint) if creator is not None else endpoint


class ProxyServer(Protocol):
    """The accepted leg: reads nothing until the upstream leg is connected."""

    log = Logger()

    def __init__(self, upstream: IStreamClientEndpoint, name: str = "upstream") -> None:
        self.upstream = upstream
        self.name = name
        self.peer: ProxyClient | None = None
        self._pending: list[bytes] = []
        self._connecting: Deferred[ProxyClient] | None = None
        self._closed = False
        self._upstreamGone = False

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]
        self._connecting = connectProtocol(self.upstream, ProxyClient(self))
        self._connecting.addCallbacks(self._upstreamConnected, self._upstreamFailed)

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
            self._pending = []
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def _upstreamFailed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError):
            return
        self.log.warn("Cannot reach {upstream}: {error}", upstream=self.name, error=failure.value)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.transport.write(data)  # type: ignore[union-attr]
        elif not self._upstreamGone:
            self._pending.append(data)  # bounded: reading is paused until upstream connects

    def upstreamLost(self, client: ProxyClient) -> None:
        """The upstream leg closed: close this one the orderly way (TLS close_notify both ways)."""
        if self.peer is client:
            self.peer = None
        self._upstreamGone = True
        if self._closed or self.transport is None:
            return
        # A TLS transport sends close_notify only once no producer is registered,
        # and must read the client's reply: reading may have been paused for upstream.
        self.transport.unregisterProducer()  # type: ignore[attr-defined]
        self.transport.resumeProducing()  # type: ignore[attr-defined]
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.transport.unregisterProducer()  # type: ignore[union-attr]
            peer.transport.loseConnection()  # type: ignore[union-attr]


class ProxyClient(Protocol):
    """The upstream leg: its bytes go back to the accepted connection."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server

    def dataReceived(self, data: bytes) -> None:
        self.server.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.server.upstreamLost(self)


class ProxyFactory(Factory):
    """Builds one :class:`ProxyServer` per accepted connection; ``name`` is for logs."""

    def __init__(self, upstream: IStreamClientEndpoint, name: str = "upstream") -> None:
        self.upstream = upstream
        self.name = name

    def buildProtocol(self, addr: IAddress) -> ProxyServer:
        protocol = ProxyServer(self.upstream, self.name)
        protocol.factory = self
        return protocol


def proxy_factory(reactor: Any, options: Mapping[str, Any]) -> ProxyFactory:
    return ProxyFactory(upstream_endpoint(reactor, options), f"upstream {options['upstream']}")


__all__ = ["FlowControl", "ProxyClient", "ProxyFactory", "ProxyServer", "proxy_factory", "upstream_endpoint"]

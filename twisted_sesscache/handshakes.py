"""Handshakes that fail or never finish: a timeout, a count, a line in the log.

:class:`HandshakeGuardFactory` goes between ``TLSMemoryBIOFactory`` and the
application's factory of any TLS listener (proxy, status page, endpoint). Each
connection gets a :class:`HandshakeGuard`: the application protocol's
transport, and the ``IHandshakeListener`` Twisted's TLS layer tells when the
handshake completes. A connection lost before that is a failed handshake
(plain HTTP sent to the TLS port, a bad hello, a client that gives up); one
that has not completed it after ``timeout`` seconds is aborted and counted as
a timeout. Both are counted in :class:`HandshakeFailures` and logged with the
peer and OpenSSL's reason, rate-limited.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.interfaces import (
    ITCPTransport,
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IProtocolNegotiationFactory,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer, providedBy
from zope.interface.declarations import Provides

from twisted_sesscache.failures import RateLimitedLog, failure_reason, peer_text
from twisted_sesscache.proxy_config import HANDSHAKE_TIMEOUT


class HandshakeFailures:
    """Counters of failed and timed-out handshakes (``counts``), and their rate-limited log.

    One instance is shared by every listener whose failures should add up in
    the same statistics (``handshake_failures``, ``handshake_timeouts``).
    """

    log = Logger(namespace="twisted_sesscache.handshakes")

    def __init__(self, clock: IReactorTime, *, log: Logger | None = None, **limits: Any) -> None:
        self.clock = clock
        self.counts: dict[str, int] = {"handshake_failures": 0, "handshake_timeouts": 0}
        self.reasons: dict[str, int] = {}  # OpenSSL's reason (or the exception) -> how many
        self._log = RateLimitedLog(log or self.log, clock, "handshake failures", level=LogLevel.info, **limits)

    def failed(self, peer: IAddress | None, reason: Failure) -> None:
        text = failure_reason(reason)
        self.counts["handshake_failures"] += 1
        self.reasons[text] = self.reasons.get(text, 0) + 1
        self._log.emit("TLS handshake with {peer} failed: {reason}", peer=peer_text(peer), reason=text)

    def timed_out(self, peer: IAddress | None, seconds: float) -> None:
        self.counts["handshake_timeouts"] += 1
        self._log.emit("TLS handshake with {peer} not completed after {seconds:g} s: dropped",
                       peer=peer_text(peer), seconds=seconds)

    def flush(self) -> None:
        """Log the pending "N more" summary now (at shutdown, say)."""
        self._log.flush()


@implementer(IHandshakeListener)
class HandshakeGuard(ProtocolWrapper):
    """Stands between the TLS layer and one application protocol until (and after) the handshake."""

    factory: HandshakeGuardFactory

    def __init__(self, factory: HandshakeGuardFactory, wrappedProtocol: IProtocol) -> None:
        super().__init__(factory, wrappedProtocol)  # type: ignore[arg-type]  # Twisted types it WrappingFactory[T]
        self.handshake_done = False
        self.timed_out = False
        self.dismissed = False  # closed by us for a reason of our own (shutdown): not the client's failure
        self.peer_address: IAddress | None = None
        self._timer: IDelayedCall | None = None

    def makeConnection(self, transport: Any) -> None:
        self.peer_address = transport.getPeer()
        timeout = self.factory.timeout
        if timeout is not None:
            self._timer = self.factory.clock.callLater(timeout, self._timeout)
        # ProtocolWrapper.makeConnection, with the declaration that this wrapper provides what
        # its transport provides made once per kind of transport (directlyProvides: ~10 µs each time).
        self.__provides__ = _provides_like(type(self), providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self.wrappedProtocol.makeConnection(cast(Any, self))  # the wrapper is its transport

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        self._cancel_timer()
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def _timeout(self) -> None:
        self._timer = None
        if self.handshake_done or self.transport is None:
            return
        self.timed_out = True
        self.factory.failures.timed_out(self.peer_address, self.factory.timeout or 0.0)
        cast(ITCPTransport, self.transport).abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        if not (self.handshake_done or self.timed_out or self.dismissed):
            self.factory.failures.failed(self.peer_address, reason)
        super().connectionLost(reason)


# (guard class, what the transport provides) -> the declaration; a handful of kinds of transport.
_PROVIDES: dict[tuple[type, Any], Any] = {}


def _provides_like(cls: type, transport_provides: Any) -> Any:
    """What ``directlyProvides(guard, transport_provides)`` would set: the same object for every connection."""
    key = (cls, transport_provides)
    found = _PROVIDES.get(key)
    if found is None:
        if len(_PROVIDES) >= 64:
            _PROVIDES.clear()
        found = _PROVIDES[key] = Provides(cls, transport_provides)
    return found


class HandshakeGuardFactory(WrappingFactory):
    """Wraps ``wrappedFactory``'s protocols in :class:`HandshakeGuard`; ``timeout`` None means none."""

    protocol = HandshakeGuard
    noisy = False

    def __init__(
        self,
        wrappedFactory: IProtocolFactory,
        failures: HandshakeFailures,
        *,
        timeout: float | None = HANDSHAKE_TIMEOUT,
        clock: IReactorTime | None = None,
    ) -> None:
        super().__init__(wrappedFactory)
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.clock: IReactorTime = clock
        self.failures = failures
        self.timeout = timeout
        # Twisted's TLS layer asks the factory it wraps for the ALPN protocols: pass the question on.
        if IProtocolNegotiationFactory.providedBy(wrappedFactory):
            alsoProvides(self, IProtocolNegotiationFactory)

    def acceptableProtocols(self) -> list[bytes]:
        return list(IProtocolNegotiationFactory(self.wrappedFactory).acceptableProtocols())

    def wrap(self, protocol: IProtocol) -> HandshakeGuard:
        """A guard around a protocol built elsewhere (by a factory that guards its own protocols)."""
        return HandshakeGuard(self, protocol)

    def abort_handshakes(self) -> int:
        """Abort every connection still handshaking (at shutdown); how many there were."""
        pending = [guard for guard in self.protocols if not guard.handshake_done and guard.transport is not None]
        for guard in pending:
            guard.dismissed = True
            guard.transport.abortConnection()
        return len(pending)


__all__ = ["HandshakeFailures", "HandshakeGuard", "HandshakeGuardFactory"]

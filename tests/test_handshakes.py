"""The handshake guard (timeout, failures counted and named) and the rate-limited failure log, on task.Clock."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer



def guarded(timeout: float | None = 10) -> tuple[Any, StringTransport, Any, Clock, list[dict[str, Any]]]:
    from twisted.logger import ILogObserver, Logger

    from twisted_sesscache.handshakes import HandshakeFailures, HandshakeGuardFactory

    clock = Clock()
    events: list[dict[str, Any]] = []
    failures = HandshakeFailures(clock, log=Logger(observer=cast(ILogObserver, events.append)))
    inner = Factory.forProtocol(Protocol)
    guard = HandshakeGuardFactory(inner, failures, timeout=timeout, clock=clock).buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
    guard.makeConnection(transport)
    return guard, transport, failures, clock, events


def test_guard_drops_a_handshake_not_done_in_time() -> None:
    from twisted.logger import formatEvent

    guard, transport, failures, clock, events = guarded(timeout=10)
    clock.advance(9.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnected
    guard.connectionLost(Failure(ConnectionDone()))
    assert failures.counts == {"handshake_failures": 0, "handshake_timeouts": 1}
    assert [formatEvent(e) for e in events] == ["TLS handshake with 192.0.2.7:40000 not completed after 10 s: dropped"]


def test_guard_passes_the_handshake_on_and_stops_its_timer() -> None:
    seen = []

    @implementer(IHandshakeListener)
    class Listener(Protocol):
        def handshakeCompleted(self) -> None:
            seen.append(True)

    guard, transport, failures, clock, events = guarded()
    guard.wrappedProtocol = Listener()
    guard.handshakeCompleted()
    clock.advance(60)
    guard.connectionLost(Failure(ConnectionDone()))
    assert seen == [True] and not transport.disconnecting and clock.getDelayedCalls() == []
    assert failures.counts == {"handshake_failures": 0, "handshake_timeouts": 0}


def test_guard_counts_and_names_a_failed_handshake() -> None:
    from OpenSSL import SSL
    from twisted.logger import formatEvent

    guard, transport, failures, clock, events = guarded()
    try:
        raise SSL.Error([("SSL routines", "", "http request")])
    except SSL.Error:
        guard.connectionLost(Failure())
    assert failures.counts["handshake_failures"] == 1 and failures.reasons == {"http request": 1}
    assert [formatEvent(e) for e in events] == ["TLS handshake with 192.0.2.7:40000 failed: http request"]


def test_failure_log_is_rate_limited_with_a_summary() -> None:
    from twisted.logger import ILogObserver, Logger, formatEvent

    from twisted_sesscache.failures import RateLimitedLog

    clock = Clock()
    events: list[dict[str, Any]] = []
    log = RateLimitedLog(Logger(observer=cast(ILogObserver, events.append)), clock, "handshake failures",
                         lines_per_second=3, summary_interval=10)
    logged = [log.emit("failure {n}", n=n) for n in range(100)]  # a scan: 100 in one instant
    assert logged.count(True) == 3 and len(events) == 3
    clock.advance(0.5)
    assert not log.emit("failure {n}", n=100)
    clock.advance(1.0)
    assert log.emit("failure {n}", n=101), "a new second: a new allowance"
    clock.advance(8.5)
    assert [formatEvent(e) for e in events[4:]] == ["98 more handshake failures in the last 10 s"]
    clock.advance(60)
    assert len(events) == 5, "nothing suppressed since: no summary"

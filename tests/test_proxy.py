"""The TLS-terminating proxy: wiring and flow control, a real relay, and ``twistd sesscache --upstream``."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from tests.support import ReactorThread, TLSFiles, free_port, reactor, resume_series, s_server
from tests.test_tap import Browser, assert_clean_exit, files_args, get, twistd
from twisted_sesscache import SessionCache
from twisted_sesscache.certs import certificate_options
from twisted_sesscache.endpoints import TLSServerEndpoint
from twisted_sesscache.proxy import FlowControl, ProxyClient, ProxyFactory, ProxyServer, upstream_endpoint

# -- wiring, with fake transports ------------------------------------------------------


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """A client endpoint whose connection attempts the test completes by hand."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Any, Deferred[Any]]] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        attempt: Deferred[Any] = Deferred()
        self.attempts.append((factory, attempt))
        return attempt


def accepted(**settings: Any) -> tuple[ProxyServer, StringTransport, FakeEndpoint]:
    """A proxied connection whose TLS handshake has just completed: the upstream attempt starts then."""
    endpoint = FakeEndpoint()
    settings.setdefault("clock", Clock())
    server = ProxyFactory(endpoint, guard=False, **settings).buildProtocol(None)
    assert isinstance(server, ProxyServer)
    transport = StringTransport()
    server.makeConnection(transport)
    assert endpoint.attempts == [], "no backend connection before the handshake"
    server.handshakeCompleted()
    return server, transport, endpoint


def connect_upstream(endpoint: FakeEndpoint) -> tuple[ProxyClient, StringTransport]:
    factory, attempt = endpoint.attempts[-1]
    client = factory.buildProtocol(None)
    transport = StringTransport()
    client.makeConnection(transport)
    attempt.callback(client)
    return client, transport


def flow_control(transport: StringTransport) -> FlowControl:
    """The producer the proxy registered on ``transport`` (StringTransport leaves that attribute typed as None)."""
    return cast(FlowControl, transport.producer)


def test_reads_nothing_until_upstream_is_connected() -> None:
    """With no room for early data (max_early_data=0), reading waits for the upstream leg."""
    server, transport, endpoint = accepted(max_early_data=0)
    assert transport.producerState == "paused" and len(endpoint.attempts) == 1
    server.dataReceived(b"early bytes")
    client, upstream = connect_upstream(endpoint)
    assert upstream.value() == b"early bytes"
    assert transport.producerState == "producing"


def test_each_leg_is_the_others_producer() -> None:
    server, transport, endpoint = accepted()
    client, upstream = connect_upstream(endpoint)
    assert flow_control(transport).transport is upstream and transport.streaming
    assert flow_control(upstream).transport is transport and upstream.streaming
    flow_control(upstream).pauseProducing()  # the upstream leg's buffer is full
    assert transport.producerState == "paused"
    flow_control(transport).pauseProducing()  # the accepted leg's buffer is full
    assert upstream.producerState == "paused"


def test_a_lost_leg_does_not_cut_the_other_under_tls() -> None:
    """A transport stops its producer when its connection is lost; for the accepted TLS leg
    that must not close TCP under TLS (the client's close_notify would go unread)."""
    server, transport, endpoint = accepted()
    client, upstream = connect_upstream(endpoint)
    flow_control(upstream).stopProducing()
    assert transport.producerState == "producing" and not transport.disconnecting
    client.connectionLost()
    assert transport.disconnecting  # closed by the protocol, the orderly way


def test_bytes_both_ways() -> None:
    server, transport, endpoint = accepted()
    client, upstream = connect_upstream(endpoint)
    server.dataReceived(b"request")
    client.dataReceived(b"response")
    assert upstream.value() == b"request" and transport.value() == b"response"


def test_upstream_close_closes_the_client_after_unregistering() -> None:
    server, transport, endpoint = accepted()
    client, upstream = connect_upstream(endpoint)
    client.connectionLost()
    assert transport.disconnecting and transport.producer is None
    assert server.peer is None


def test_upstream_close_while_paused_still_reads_the_clients_close_notify() -> None:
    server, transport, endpoint = accepted()
    client, upstream = connect_upstream(endpoint)
    flow_control(upstream).pauseProducing()  # upstream was not keeping up
    client.connectionLost()
    assert transport.producerState == "producing" and transport.disconnecting
    server.dataReceived(b"late bytes from the client")
    assert server._pending == [], "nothing to relay them to, so nothing is kept"


def test_client_close_closes_upstream() -> None:
    server, transport, endpoint = accepted()
    client, upstream = connect_upstream(endpoint)
    server.connectionLost()
    assert upstream.disconnecting and upstream.producer is None
    client.connectionLost()
    assert server.peer is None


def test_unreachable_upstream_aborts_the_client() -> None:
    server, transport, endpoint = accepted()
    endpoint.attempts[0][1].errback(ConnectionRefusedError())
    assert transport.disconnecting


def test_client_gone_before_upstream_connects() -> None:
    server, transport, endpoint = accepted()
    attempt = endpoint.attempts[0][1]
    server.connectionLost()
    assert attempt.called, "the connection attempt is cancelled"
    attempt.addErrback(lambda failure: None)


def test_upstream_endpoint_is_built_from_the_options() -> None:
    endpoint = upstream_endpoint(reactor, {"upstream": "tcp:127.0.0.1:8080"})
    assert isinstance(endpoint, TCP4ClientEndpoint)


# -- handshake first, early data, idle, resets, shutdown (task.Clock) -----------------------


def test_early_data_is_held_up_to_the_limit_then_reading_pauses() -> None:
    server, transport, endpoint = accepted(max_early_data=64 * 1024)
    server.dataReceived(b"a" * 40_000)
    assert transport.producerState == "producing"
    server.dataReceived(b"b" * 40_000)
    assert transport.producerState == "paused", "more than 64 KiB held: stop reading the client"
    client, upstream = connect_upstream(endpoint)
    assert upstream.value() == b"a" * 40_000 + b"b" * 40_000
    assert transport.producerState == "producing"


def test_idle_both_ways_closes_both_legs() -> None:
    clock = Clock()
    server, transport, endpoint = accepted(clock=clock, idle_timeout=600)
    client, upstream = connect_upstream(endpoint)
    clock.advance(300)
    client.dataReceived(b"traffic from upstream")
    clock.advance(599)
    assert not upstream.disconnecting, "traffic 299 s ago: not idle"
    clock.advance(1)
    assert upstream.disconnecting and upstream.producer is None
    client.connectionLost()
    assert transport.disconnecting


def test_upstream_reset_reaches_the_client_as_an_abort_not_a_clean_close() -> None:
    from twisted.internet.error import ConnectionLost

    server, transport, endpoint = accepted()
    client, upstream = connect_upstream(endpoint)
    client.connectionLost(Failure(ConnectionLost("Connection reset by peer")))
    assert transport.disconnected, "no TLS handle here: abortConnection"
    assert server.proxy.counts["upstream_resets"] == 1


def test_upstream_reset_under_tls_skips_close_notify_after_the_relayed_bytes() -> None:
    from OpenSSL import SSL
    from twisted.internet.error import ConnectionLost

    class Handle:
        shutdown = 0

        def set_shutdown(self, state: int) -> None:
            self.shutdown = state

    class TLSTransport(StringTransport):
        handle = Handle()

        def getHandle(self) -> Handle:
            return self.handle

    endpoint = FakeEndpoint()
    server: Any = ProxyFactory(endpoint, guard=False, clock=Clock()).buildProtocol(None)
    transport = TLSTransport()
    server.makeConnection(transport)
    server.handshakeCompleted()
    client, upstream = connect_upstream(endpoint)
    client.dataReceived(b"half a body")
    client.connectionLost(Failure(ConnectionLost()))
    assert transport.value() == b"half a body" and transport.disconnecting and not transport.disconnected
    assert transport.handle.shutdown == SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN, "no close_notify is sent"


def test_unreachable_upstream_is_counted() -> None:
    server, transport, endpoint = accepted()
    endpoint.attempts[0][1].errback(ConnectionRefusedError())
    assert server.proxy.counts["upstream_connect_failures"] == 1
    assert server.proxy.stats() == {"handshake_failures": 0, "handshake_timeouts": 0, "upstream_connect_failures": 1,
                                    "upstream_tls_failures": 0, "upstream_resets": 0, "open_connections": 1}


def test_shutdown_waits_for_proxied_connections() -> None:
    clock = Clock()
    factory = ProxyFactory(FakeEndpoint(), guard=False, clock=clock)
    servers = []
    for _ in range(2):
        server: Any = factory.buildProtocol(None)
        server.makeConnection(StringTransport())
        server.handshakeCompleted()
        servers.append(server)
    done = factory.shutdown(10)
    servers[0].connectionLost()
    clock.advance(5)
    assert not done.called
    servers[1].connectionLost()
    assert done.called


def test_shutdown_closes_what_is_left_at_the_deadline_and_drops_handshakes() -> None:
    from twisted_sesscache.shutdown import GRACE

    clock = Clock()
    endpoint = FakeEndpoint()
    factory = ProxyFactory(endpoint, clock=clock)
    guard: Any = factory.buildProtocol(None)
    handshaking = StringTransport()
    guard.makeConnection(handshaking)
    server, transport, endpoint = accepted(clock=clock)
    factory.drain.add(server)
    client, upstream = connect_upstream(endpoint)
    done = factory.shutdown(10)
    assert handshaking.disconnected, "a handshake in progress has nothing in flight: dropped at once"
    guard.connectionLost(Failure(ConnectionDone()))
    assert factory.handshakes.counts == {"handshake_failures": 0, "handshake_timeouts": 0}
    clock.advance(10)
    assert upstream.disconnecting and not done.called
    clock.advance(GRACE)
    assert transport.disconnected and done.called


@pytest.mark.parametrize("bad", [{"upstream_proxy_protocol": "v3"}, {"handshake_timeout": 0},
                                 {"idle_timeout": -1}, {"max_early_data": -1}, {"shutdown_timeout": 0}])
def test_bad_settings_name_the_setting(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as raised:
        ProxyFactory(FakeEndpoint(), clock=Clock(), **bad)
    assert str(raised.value).startswith(next(iter(bad)))


def test_no_factory_says_starting_or_stopping_per_connection() -> None:
    from twisted_sesscache.proxy import _UpstreamFactory
    from twisted_sesscache.proxy_protocol import _HeaderFirstFactory

    factory = ProxyFactory(FakeEndpoint(), clock=Clock())
    assert not factory.noisy and factory.guard is not None and not factory.guard.noisy
    assert not _UpstreamFactory(None).noisy  # type: ignore[arg-type]
    assert not _HeaderFirstFactory(factory, b"").noisy


# -- PROXY protocol headers ------------------------------------------------------------


def test_proxy_protocol_headers() -> None:
    from twisted.internet.address import IPv6Address

    from twisted_sesscache.proxy_protocol import V2_SIGNATURE, header

    v4 = (IPv4Address("TCP", "192.0.2.7", 40000), IPv4Address("TCP", "10.0.0.1", 8443))
    v6 = (IPv6Address("TCP", "2001:db8::7", 40000), IPv6Address("TCP", "::1", 8443))
    assert header("v1", *v4) == b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 8443\r\n"
    assert header("v1", *v6) == b"PROXY TCP6 2001:db8::7 ::1 40000 8443\r\n"
    assert header("v2", *v4) == (V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes([192, 0, 2, 7, 10, 0, 0, 1])
                                 + b"\x9c\x40\x20\xfb")
    v2_v6 = header("v2", *v6)
    assert v2_v6[12:16] == b"\x21\x21\x00\x24" and len(v2_v6) == 16 + 36
    assert v2_v6[16:32] == socket.inet_pton(socket.AF_INET6, "2001:db8::7")
    from twisted.internet.address import UNIXAddress

    unix = (UNIXAddress(b"/tmp/s"), UNIXAddress(b"/tmp/s"))
    assert header("v1", *unix) == b"PROXY UNKNOWN\r\n"
    assert header("v2", *unix) == V2_SIGNATURE + b"\x20\x00\x00\x00"


# -- a real relay ---------------------------------------------------------------------------


class Upstream(Protocol):
    """Echoes bytes; answers an HTTP request with what it got and closes, so that s_client sees a reply."""

    def __init__(self) -> None:
        self.buffer = b""
        self.http: bool | None = None

    def connectionMade(self) -> None:
        self.factory.connections += 1

    def dataReceived(self, data: bytes) -> None:
        if self.http is None:
            self.buffer += data
            if len(self.buffer) < 4:
                return
            self.http, data, self.buffer = self.buffer.startswith(b"GET "), self.buffer, b""
        if not self.http:
            self.transport.write(data)  # type: ignore[union-attr]
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            self.transport.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nupstream got: " + self.buffer)  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]


@contextmanager
def upstream_server(rt: ReactorThread) -> Iterator[tuple[int, Factory[Upstream]]]:
    factory = Factory.forProtocol(Upstream)
    factory.connections = 0  # type: ignore[attr-defined]
    port = rt.call(reactor.listenTCP, 0, factory, interface="127.0.0.1")
    try:
        yield port.getHost().port, factory
    finally:
        rt.call(port.stopListening)


class SlowReader(Protocol):
    """Sends a payload, stops reading until told, and collects the echo."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = hashlib.sha256()
        self.count = 0
        self.done: Deferred[str] = Deferred()
        self.sent = False

    def connectionMade(self) -> None:
        self.transport.write(b"ping")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        if not self.sent:  # the handshake is done and the relay is up: now flood it, reading nothing
            assert data == b"ping"
            self.sent = True
            self.count = 0
            self.transport.pauseProducing()  # type: ignore[union-attr]
            self.transport.write(self.payload)  # type: ignore[union-attr]
            return
        self.received.update(data)
        if self.count >= len(self.payload):
            self.transport.loseConnection()  # type: ignore[union-attr]
            self.done.callback(self.received.hexdigest())


def test_flow_control_stops_reading_upstream_while_the_client_does_not_read(
    reactor_thread: ReactorThread, tls_files: TLSFiles
) -> None:
    rt = reactor_thread
    payload = bytes(range(256)) * (64 * 1024)  # 16 MiB: more than loopback socket buffers hold
    servers: list[ProxyServer] = []

    class RecordingProxyFactory(ProxyFactory):
        def buildProtocol(self, addr: Any) -> Any:
            protocol: Any = super().buildProtocol(addr)
            servers.append(protocol.wrappedProtocol)  # inside its handshake guard
            return protocol

    creator = SessionCache().server_context_factory(certificate_options(tls_files.certificate, tls_files.private_key))
    with upstream_server(rt) as (upstream_port, _):
        proxy_endpoint = TLSServerEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), creator)
        upstream = TCP4ClientEndpoint(reactor, "127.0.0.1", upstream_port)
        port = rt.call(proxy_endpoint.listen, RecordingProxyFactory(upstream))
        try:
            trust = Certificate.loadPEM(tls_files.certificate.read_bytes())
            client_endpoint = SSL4ClientEndpoint(
                reactor, "127.0.0.1", cast(IPv4Address, port.getHost()).port, optionsForClientTLS("localhost", trustRoot=trust)
            )
            client = SlowReader(payload)
            rt.call(connectProtocol, client_endpoint, client)

            def upstream_leg_paused() -> bool:
                peer = servers[0].peer if servers else None
                return bool(client.sent and peer is not None and peer.transport not in reactor.getReaders())

            deadline = time.monotonic() + 10
            while not rt.call(upstream_leg_paused):
                assert time.monotonic() < deadline, "the proxy kept reading upstream for a client that does not read"
                time.sleep(0.05)
            rt.call(cast(IPushProducer, client.transport).resumeProducing)  # the TLS transport
            digest = rt.call(lambda: client.done)
        finally:
            rt.call(port.stopListening)
    assert digest == hashlib.sha256(payload).hexdigest()


# -- through twistd --------------------------------------------------------------------------


def test_twistd_proxy_resumes_and_relays(
    reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path
) -> None:
    port = free_port()
    with upstream_server(reactor_thread) as (upstream_port, upstream_factory):
        with twistd(
            tmp_path, "sesscache", "--listen", f"tcp:{port}:interface=127.0.0.1", *files_args(tls_files),
            "--upstream", f"tcp:127.0.0.1:{upstream_port}",
        ) as process:
            process.wait_for(port)
            assert resume_series(port, tmp_path, 3, tls="1.2") == ["New", "Reused", "Reused"]
            assert resume_series(port, tmp_path, 3, tls="1.3") == ["New", "Reused", "Reused"]
            response = Browser(ssl.TLSVersion.TLSv1_3).get(port, "/round-trip?x=1")
            assert_clean_exit(process)
    assert response.startswith(b"HTTP/1.0 200 OK")
    assert b"upstream got: GET /round-trip?x=1 HTTP/1.1\r\nHost: localhost\r\n" in response
    assert upstream_factory.connections >= 7  # type: ignore[attr-defined]


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_in_process_proxy_resumes(reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path, tls: str) -> None:
    rt = reactor_thread
    cache = SessionCache()
    creator = cache.server_context_factory(certificate_options(tls_files.certificate, tls_files.private_key))
    with upstream_server(rt) as (upstream_port, _):
        endpoint = TLSServerEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), creator)
        port = rt.call(endpoint.listen, ProxyFactory(TCP4ClientEndpoint(reactor, "127.0.0.1", upstream_port)))
        try:
            assert resume_series(cast(IPv4Address, port.getHost()).port, tmp_path, 3, tls=tls) == ["New", "Reused", "Reused"]
        finally:
            rt.call(port.stopListening)
    assert rt.call(cache.stats)["hits"] == 2


# -- the upstream leg over TLS ---------------------------------------------------------


def fetch_through(port: int) -> bytes:
    """One request through the proxy, as a client that does not resume (only the upstream leg may).

    What was relayed before the proxy closed; a reset counts as the close it is.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
                while chunk := tls.recv(65536):
                    chunks.append(chunk)
        except (ConnectionResetError, ssl.SSLEOFError):
            pass
    return b"".join(chunks)


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_upstream_tls_leg_resumes(tmp_path: Path, tls_files: TLSFiles, tls: str) -> None:
    port, stats_port = free_port(), free_port()
    with s_server(tls_files, tls) as backend, twistd(
        tmp_path, "sesscache", *files_args(tls_files),
        "--listen", f"tcp:{port}:interface=127.0.0.1", "--stats", f"tcp:{stats_port}:interface=127.0.0.1",
        "--upstream", f"tcp:127.0.0.1:{backend}", "--upstream-tls", "--upstream-hostname", "localhost",
        "--upstream-ca", str(tls_files.certificate), "--session-cache-mode", "both",
    ) as proxy:
        proxy.wait_for(port, stats_port)
        pages = [fetch_through(port) for _ in range(20)]
        stats = json.loads(get(f"http://127.0.0.1:{stats_port}/stats.json"))
        metrics = get(f"http://127.0.0.1:{stats_port}/metrics").decode()
    assert f"sesscache_client_hits_total {float(stats['client']['hits'])}" in metrics
    reused = sum(b"Reused, TLSv1" in page for page in pages)
    assert all(b"TLSv1" in page for page in pages), pages[0][:300]
    assert reused >= 19, [page[:80] for page in pages]
    assert stats["client"]["hits"] == reused and stats["client"]["connect_good"] == 20


def test_upstream_tls_verifies_the_backend(tmp_path: Path, tls_files: TLSFiles, other_tls_files: TLSFiles) -> None:
    port = free_port()
    with s_server(tls_files, "1.3") as backend, twistd(
        tmp_path, "sesscache", *files_args(tls_files), "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--upstream", f"tcp:127.0.0.1:{backend}", "--upstream-tls", "--upstream-hostname", "localhost",
        "--upstream-ca", str(other_tls_files.certificate), "--session-cache-mode", "both",
    ) as proxy:
        proxy.wait_for(port)
        assert b"TLSv1" not in fetch_through(port)  # the backend is not trusted: nothing relayed


@pytest.mark.parametrize(
    "args, option",
    [
        (["--upstream-tls"], "--upstream-tls"),
        (["--upstream", "tcp:127.0.0.1:1", "--upstream-ca", "/nonexistent.pem"], "--upstream-ca"),
        (["--upstream", "tcp:127.0.0.1:1", "--upstream-tls", "--upstream-ca", "/nonexistent.pem"], "--upstream-ca"),
        (["--upstream", "tcp:127.0.0.1:1", "--upstream-tls", "--upstream-certificate", "/nonexistent.pem"],
         "--upstream-certificate"),
        (["--upstream", "unix:/tmp/x.sock", "--upstream-tls"], "--upstream-hostname"),
    ],
)
def test_upstream_tls_bad_input(tls_files: TLSFiles, args: list[str], option: str) -> None:
    from twisted.python import usage

    from twisted_sesscache.tap import Options

    with pytest.raises(usage.UsageError) as raised:
        Options().parseOptions([*files_args(tls_files), *args])
    assert str(raised.value).startswith(option) and "\n" not in str(raised.value)

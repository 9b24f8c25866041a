"""The proxy against real clients and real backends (plain TCP and TLS).

Idle TCP clients, plain HTTP on the TLS port, an upstream reset mid-body, a
backend that fails verification, the PROXY header read by Twisted's own
``haproxy:`` endpoint, and SIGTERM with requests in flight (``twistd sesscache``).
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher

from tests.support import ReactorThread, TLSFiles, free_port
from tests.test_proxy import Upstream
from tests.test_tap import assert_usage_error, files_args, run_twistd, twistd
from twisted_sesscache.certs import certificate_options
from twisted_sesscache.endpoints import TLSServerEndpoint
from twisted_sesscache.handshakes import HandshakeFailures
from twisted_sesscache.proxy import ProxyFactory

BACKENDS = ["tcp", "tls"]


def until(condition: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@dataclass
class Backend:
    port: int
    factory: Factory[Any]
    tls: bool

    @property
    def connections(self) -> int:
        return int(self.factory.connections)  # type: ignore[attr-defined]


@contextmanager
def backend(rt: ReactorThread, files: TLSFiles, tls: bool, protocol: type[Protocol] = Upstream,
            description: str = "tcp:0:interface=127.0.0.1") -> Iterator[Backend]:
    """A backend on 127.0.0.1 (TLS when ``tls``, above whatever ``description`` says) counting its connections."""
    factory = Factory.forProtocol(protocol)
    factory.connections = 0  # type: ignore[attr-defined]
    endpoint: Any = serverFromString(reactor, description)
    if tls:
        endpoint = TLSServerEndpoint(endpoint, certificate_options(files.certificate, files.private_key))
    port = rt.call(endpoint.listen, factory)
    try:
        yield Backend(port.getHost().port, factory, tls)
    finally:
        rt.call(port.stopListening)


@dataclass
class Proxy:
    port: int
    factory: ProxyFactory
    lines: list[str] = field(default_factory=list)

    def count(self, name: str) -> int:
        counts = {**self.factory.handshakes.counts, **self.factory.counts}
        return counts[name]


@contextmanager
def proxy(rt: ReactorThread, files: TLSFiles, upstream: Backend | int, *, trust: TLSFiles | None = None,
          listen: Any = None, **settings: Any) -> Iterator[Proxy]:
    """``ProxyFactory`` behind a TLS listener, in the reactor thread; every log line it makes is kept."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        text = formatEvent(event)
        if event.get("log_namespace", "").startswith("twisted_sesscache") or "factory" in text:
            lines.append(text)

    upstream_port = upstream if isinstance(upstream, int) else upstream.port
    if isinstance(upstream, Backend) and upstream.tls:
        root = Certificate.loadPEM((trust or files).certificate.read_bytes())
        settings["upstream_creator"] = optionsForClientTLS("localhost", trustRoot=root)
    factory = ProxyFactory(TCP4ClientEndpoint(reactor, "127.0.0.1", upstream_port), **settings,
                           handshakes=HandshakeFailures(reactor), clock=reactor)
    creator = certificate_options(files.certificate, files.private_key)
    endpoint = TLSServerEndpoint(listen or TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), creator)
    globalLogPublisher.addObserver(cast(ILogObserver, observe))
    port = rt.call(endpoint.listen, factory)
    try:
        yield Proxy(cast("IPv4Address | IPv6Address", port.getHost()).port, factory, lines)
    finally:
        rt.call(port.stopListening)
        globalLogPublisher.removeObserver(cast(ILogObserver, observe))


def tls_client() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    # Python sets OP_IGNORE_UNEXPECTED_EOF, which makes a close without close_notify look clean.
    context.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
    return context


def request(port: int, path: str = "/", host: str = "127.0.0.1", bound: list[Any] | None = None) -> tuple[bytes, str]:
    """One request; what arrived and how it ended: "close_notify", or the exception (and OpenSSL's reason)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    chunks = []
    with socket.socket(family) as raw:
        raw.settimeout(10)
        raw.connect((host, port))
        if bound is not None:
            bound.append(raw.getsockname())
        with tls_client().wrap_socket(raw, suppress_ragged_eofs=False) as tls:
            try:
                tls.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
                while chunk := tls.recv(65536):
                    chunks.append(chunk)
            except (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError, ssl.SSLError) as error:
                return b"".join(chunks), f"{type(error).__name__} {getattr(error, 'reason', '') or ''}".strip()
    return b"".join(chunks), "close_notify"


# -- idle clients and failed handshakes ---------------------------------------------------


@pytest.mark.parametrize("kind", BACKENDS)
def test_idle_clients_open_no_backend_connection_and_are_dropped(
    reactor_thread: ReactorThread, tls_files: TLSFiles, kind: str
) -> None:
    with backend(reactor_thread, tls_files, kind == "tls") as upstream, \
            proxy(reactor_thread, tls_files, upstream, handshake_timeout=1.0) as relay:
        started = time.monotonic()
        sockets = [socket.create_connection(("127.0.0.1", relay.port), timeout=10) for _ in range(20)]
        dropped = []
        try:
            for client in sockets:
                try:
                    assert client.recv(1024) == b""
                except ConnectionResetError:
                    pass
                dropped.append(time.monotonic() - started)
        finally:
            for client in sockets:
                client.close()
        until(lambda: relay.count("handshake_timeouts") == 20, what="20 handshake timeouts")
        assert upstream.connections == 0
        assert relay.count("handshake_failures") == 0
        # Then a real client still gets through: the backend is fine, only the idle ones were dropped.
        page, end = request(relay.port)
    assert 0.9 <= min(dropped) and max(dropped) < 4, dropped
    assert page.startswith(b"HTTP/1.0 200 OK") and end == "close_notify" and upstream.connections == 1
    timeouts = [line for line in relay.lines if "not completed after 1 s" in line]
    assert 3 <= len(timeouts) < 20, "rate-limited: a few lines, the rest in the summary"
    assert not [line for line in relay.lines if "Starting factory" in line or "Stopping factory" in line]


@pytest.mark.parametrize("kind", BACKENDS)
def test_plain_http_on_the_tls_port_is_counted_and_logged_once(
    reactor_thread: ReactorThread, tls_files: TLSFiles, kind: str
) -> None:
    with backend(reactor_thread, tls_files, kind == "tls") as upstream, \
            proxy(reactor_thread, tls_files, upstream) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as client:
            client_port = client.getsockname()[1]
            client.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            try:
                while client.recv(4096):
                    pass
            except ConnectionResetError:
                pass
        until(lambda: relay.count("handshake_failures") == 1, what="the failure to be counted")
        time.sleep(0.2)
        assert upstream.connections == 0
    failures = [line for line in relay.lines if "TLS handshake with" in line]
    assert failures == [f"TLS handshake with 127.0.0.1:{client_port} failed: http request"]
    assert relay.factory.handshakes.reasons == {"http request": 1}


def test_a_client_that_rejects_the_certificate_is_counted_with_the_alert(
    reactor_thread: ReactorThread, tls_files: TLSFiles
) -> None:
    with backend(reactor_thread, tls_files, False) as upstream, proxy(reactor_thread, tls_files, upstream) as relay:
        strict = ssl.create_default_context()  # the platform's trust store: our self-signed certificate is unknown
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                strict.wrap_socket(raw, server_hostname="localhost")
        until(lambda: relay.count("handshake_failures") == 1, what="the failure to be counted")
        assert upstream.connections == 0
    (reason,) = relay.factory.handshakes.reasons
    assert "alert" in reason and ("unknown ca" in reason or "certificate unknown" in reason), reason


# -- what the upstream leg does, passed on ------------------------------------------------

BODY_PART = b"x" * 100_000


class ResetMidBody(Protocol):
    """Sends headers and part of a body, then resets TCP (SO_LINGER 0): the proxy must not make it look clean."""

    def connectionMade(self) -> None:
        self.factory.connections += 1

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.0 200 OK\r\nContent-Length: 1000000\r\n\r\n" + BODY_PART)  # type: ignore[union-attr]
        reactor.callLater(0.3, self.reset)

    def reset(self) -> None:
        tcp: Any = self.transport
        while not hasattr(tcp, "socket"):  # under TLS: the TCP transport below it
            tcp = tcp.transport
        tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tcp.abortConnection()


@pytest.mark.parametrize("kind", BACKENDS)
def test_upstream_reset_mid_body_reaches_the_client_as_truncation(
    reactor_thread: ReactorThread, tls_files: TLSFiles, kind: str
) -> None:
    with backend(reactor_thread, tls_files, kind == "tls", ResetMidBody) as upstream, \
            proxy(reactor_thread, tls_files, upstream) as relay:
        page, end = request(relay.port)
        until(lambda: relay.count("upstream_resets") == 1, what="the reset to be counted")
    assert end.startswith("ConnectionResetError") or "EOF" in end, end  # e.g. SSLError UNEXPECTED_EOF_WHILE_READING
    assert page.endswith(BODY_PART), "what the backend sent before the reset still arrives"
    resets = [line for line in relay.lines if "reset or closed without a clean end" in line]
    assert len(resets) == 1 and ("ConnectionLost" in resets[0] or "ConnectionAborted" in resets[0]), relay.lines


@pytest.mark.parametrize("kind", BACKENDS)
def test_clean_upstream_close_reaches_the_client_as_close_notify(
    reactor_thread: ReactorThread, tls_files: TLSFiles, kind: str
) -> None:
    with backend(reactor_thread, tls_files, kind == "tls") as upstream, \
            proxy(reactor_thread, tls_files, upstream) as relay:
        page, end = request(relay.port, "/clean")
    assert b"upstream got: GET /clean" in page and end == "close_notify"
    assert relay.factory.counts == {"upstream_connect_failures": 0, "upstream_tls_failures": 0, "upstream_resets": 0}


def test_upstream_refusal_and_failed_verification_are_logged(
    reactor_thread: ReactorThread, tls_files: TLSFiles, other_tls_files: TLSFiles
) -> None:
    with proxy(reactor_thread, tls_files, free_port()) as relay:
        page, end = request(relay.port)
        until(lambda: relay.count("upstream_connect_failures") == 1, what="the refusal to be counted")
    assert page == b"" and end != "close_notify"
    assert [line for line in relay.lines if "cannot reach" in line and "Connection refused" in line], relay.lines
    with backend(reactor_thread, tls_files, True) as upstream, \
            proxy(reactor_thread, tls_files, upstream, trust=other_tls_files) as relay:
        page, end = request(relay.port)
        until(lambda: relay.count("upstream_tls_failures") == 1, what="the TLS failure to be counted")
    assert page == b"" and end != "close_notify"
    assert [line for line in relay.lines if "TLS with" in line and "certificate verify failed" in line], relay.lines


# -- PROXY protocol, read by Twisted's own haproxy: endpoint ---------------------------


class WhoAmI(Protocol):
    """Answers with the peer and host its transport reports: through haproxy:, the PROXY header's."""

    def connectionMade(self) -> None:
        self.factory.connections += 1

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        # TCP addresses (through haproxy:, the PROXY header's): IPv4Address or IPv6Address.
        peer = cast("IPv4Address | IPv6Address", self.transport.getPeer())
        host = cast("IPv4Address | IPv6Address", self.transport.getHost())
        # The v2 parser spells IPv6 addresses in full (0:0:...:1): compare them as addresses.
        seen = f"peer {ip_address(peer.host)} {peer.port} host {ip_address(host.host)} {host.port}"
        self.transport.write(f"HTTP/1.0 200 OK\r\n\r\n{seen}\n".encode())
        self.transport.loseConnection()


@contextmanager
def haproxy_backend(rt: ReactorThread, files: TLSFiles, tls: bool) -> Iterator[Backend]:
    """Twisted's haproxy: endpoint as the backend: the PROXY header comes first, then TLS."""
    with backend(rt, files, tls, WhoAmI, "haproxy:tcp:0:interface=127.0.0.1") as found:
        yield found


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_backend_sees_the_client_address_through_the_proxy_protocol(
    reactor_thread: ReactorThread, tls_files: TLSFiles, version: str, kind: str, family: str
) -> None:
    if family == "ipv6" and not ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1) on this machine: the TCP6 header needs a client on ::1")
    host = "::1" if family == "ipv6" else "127.0.0.1"
    listen = TCP6ServerEndpoint(reactor, 0, interface="::1") if family == "ipv6" else None
    with haproxy_backend(reactor_thread, tls_files, kind == "tls") as upstream, \
            proxy(reactor_thread, tls_files, upstream, listen=listen, upstream_proxy_protocol=version) as relay:
        bound: list[Any] = []
        page, end = request(relay.port, host=host, bound=bound)
    client_port = bound[0][1]
    assert page.endswith(f"peer {host} {client_port} host {host} {relay.port}\n".encode()), page
    assert end == "close_notify" and upstream.connections == 1


# -- SIGTERM with requests in flight (a real twistd) -----------------------------------

SLOW_BODY = bytes(range(256)) * 1024  # 256 KiB


class Slow(Protocol):
    """An HTTP/1.0 backend that answers ``delay`` seconds after the request, then closes."""

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            self.factory.requests += 1
            reactor.callLater(self.factory.delay, self.answer)

    def answer(self) -> None:
        if self.transport is not None and self.transport.connected:  # type: ignore[attr-defined]
            head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(SLOW_BODY)}\r\n\r\n".encode()
            self.transport.write(head + SLOW_BODY)
            self.transport.loseConnection()


def sigterm_in_flight(rt: ReactorThread, files: TLSFiles, tmp_path: Path, delay: float, timeout: float,
                      count: int = 20) -> dict[str, Any]:
    """``count`` requests through ``twistd sesscache``, SIGTERM once the backend has them all; what each got."""
    port = free_port()
    with backend(rt, files, False, Slow) as upstream:
        upstream.factory.requests, upstream.factory.delay = 0, delay  # type: ignore[attr-defined]
        with twistd(tmp_path, "sesscache", "--listen", f"tcp:{port}:interface=127.0.0.1", *files_args(files),
                    "--upstream", f"tcp:127.0.0.1:{upstream.port}", "--shutdown-timeout", str(timeout)) as process:
            process.wait_for(port)
            results: list[tuple[bytes, str]] = []
            clients = [threading.Thread(target=lambda: results.append(request(port, "/slow"))) for _ in range(count)]
            for client in clients:
                client.start()
            until(lambda: upstream.factory.requests == count, what="every request at the backend")  # type: ignore[attr-defined]
            signalled = time.monotonic()
            process.process.terminate()
            time.sleep(0.3)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                accepting = True
            except ConnectionRefusedError:
                accepting = False
            for client in clients:
                client.join(30)
            status = process.process.wait(30)
            exited = time.monotonic() - signalled
            output = process.output()
    return {"results": results, "accepting": accepting, "status": status, "exited": exited, "output": output}


def test_sigterm_lets_requests_in_flight_finish(reactor_thread: ReactorThread, tls_files: TLSFiles,
                                                tmp_path: Path) -> None:
    run = sigterm_in_flight(reactor_thread, tls_files, tmp_path, delay=1.0, timeout=10)
    complete = [page for page, end in run["results"]
                if page.startswith(b"HTTP/1.0 200 OK") and page.endswith(b"\r\n\r\n" + SLOW_BODY) and end == "close_notify"]
    assert len(complete) == 20, [(page[:40], len(page), end) for page, end in run["results"]]
    assert not run["accepting"], "stopped accepting at SIGTERM"
    assert "Shutdown: every one of the proxied connections finished" in run["output"], run["output"]
    assert "Traceback" not in run["output"] and run["exited"] < 5, run["output"]


def test_sigterm_cuts_what_is_still_open_at_the_shutdown_timeout(reactor_thread: ReactorThread, tls_files: TLSFiles,
                                                                 tmp_path: Path) -> None:
    run = sigterm_in_flight(reactor_thread, tls_files, tmp_path, delay=30.0, timeout=1, count=5)
    ends = sorted(end for page, end in run["results"])
    assert len(ends) == 5 and "close_notify" not in ends, ends  # cut responses must not look complete
    assert "Shutdown: closing 5 proxied connections still open after 1 s" in run["output"], run["output"]
    assert run["exited"] < 6, run["output"]


# -- the guard under any listener: the status page (a twisted.web Site) -----------------


def test_guard_under_the_status_site_keeps_alpn_and_tls_and_counts_failures(
    reactor_thread: ReactorThread, tls_files: TLSFiles
) -> None:
    import json

    from twisted_sesscache import SessionCache
    from twisted_sesscache.handshakes import HandshakeGuardFactory
    from twisted_sesscache.status import status_site

    rt = reactor_thread
    cache = SessionCache()
    failures = HandshakeFailures(reactor)
    site = HandshakeGuardFactory(status_site(cache), failures, timeout=1.0, clock=reactor)
    endpoint = TLSServerEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
                                 cache.server_context_factory(certificate_options(tls_files.certificate,
                                                                                  tls_files.private_key)))
    port = rt.call(endpoint.listen, site)
    try:
        number = cast(IPv4Address, port.getHost()).port
        context = tls_client()
        context.set_alpn_protocols(["h2", "http/1.1"])
        with socket.create_connection(("127.0.0.1", number), timeout=10) as raw, \
                context.wrap_socket(raw) as tls:
            alpn = tls.selected_alpn_protocol()
            tls.sendall(b"GET /status.json HTTP/1.0\r\nHost: localhost\r\n\r\n")
            page = b""
            while chunk := tls.recv(65536):
                page += chunk
        with socket.create_connection(("127.0.0.1", number), timeout=10) as idle:
            try:
                assert idle.recv(10) == b""  # dropped after the handshake timeout
            except ConnectionResetError:
                pass
        until(lambda: failures.counts["handshake_timeouts"] == 1, what="the idle client to be dropped")
    finally:
        rt.call(port.stopListening)
    assert alpn == "http/1.1", "the Site's ALPN list still reaches the TLS layer through the guard"
    assert json.loads(page.split(b"\r\n\r\n", 1)[1])["connection"]["tls"] is True
    assert failures.counts == {"handshake_failures": 0, "handshake_timeouts": 1}


# -- the same through twistd sesscache's options ------------------------------------------


def test_twistd_drops_idle_clients_without_a_backend_connection(
    reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path
) -> None:
    port = free_port()
    with backend(reactor_thread, tls_files, False) as upstream:
        with twistd(tmp_path, "sesscache", "--listen", f"tcp:{port}:interface=127.0.0.1", *files_args(tls_files),
                    "--upstream", f"tcp:127.0.0.1:{upstream.port}", "--handshake-timeout", "1") as process:
            process.wait_for(port)
            started = time.monotonic()
            sockets = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
            try:
                for client in sockets:
                    try:
                        client.recv(10)
                    except ConnectionResetError:
                        pass
            finally:
                for client in sockets:
                    client.close()
            dropped = time.monotonic() - started
            time.sleep(1.1)  # past this second's allowance of lines, spent on the timeouts
            with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
                plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
                plain_port = plain.getsockname()[1]
                try:
                    plain.recv(10)
                except ConnectionResetError:
                    pass
            page, end = request(port)
            output = process.output()
    assert 0.9 <= dropped < 4 and upstream.connections == 1, (dropped, upstream.connections)  # the real client's
    assert page.startswith(b"HTTP/1.0 200 OK") and end == "close_notify"
    assert output.count(f"TLS handshake with 127.0.0.1:{plain_port} failed: http request") == 1, output
    assert "not completed after 1 s: dropped" in output
    assert "Starting factory" not in output and "Stopping factory" not in output, output


def test_twistd_sends_the_proxy_header(reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path) -> None:
    port = free_port()
    with haproxy_backend(reactor_thread, tls_files, False) as upstream:
        with twistd(tmp_path, "sesscache", "--listen", f"tcp:{port}:interface=127.0.0.1", *files_args(tls_files),
                    "--upstream", f"tcp:127.0.0.1:{upstream.port}", "--upstream-proxy-protocol", "v2") as process:
            process.wait_for(port)
            bound: list[Any] = []
            page, end = request(port, bound=bound)
    assert page.endswith(f"peer 127.0.0.1 {bound[0][1]} host 127.0.0.1 {port}\n".encode()), page


@pytest.mark.parametrize(
    "args, option",
    [
        (["--handshake-timeout", "soon"], "--handshake-timeout"),
        (["--handshake-timeout", "0"], "--handshake-timeout"),
        (["--idle-timeout", "-5"], "--idle-timeout"),
        (["--shutdown-timeout", "nan"], "--shutdown-timeout"),
        (["--upstream-proxy-protocol", "v3"], "--upstream-proxy-protocol"),
    ],
)
def test_twistd_refuses_bad_proxy_settings(tls_files: TLSFiles, args: list[str], option: str) -> None:
    done = run_twistd("sesscache", *files_args(tls_files), "--upstream", "tcp:127.0.0.1:1", *args)
    assert_usage_error(done, option)


def test_twistd_refuses_proxy_settings_without_upstream(tls_files: TLSFiles) -> None:
    assert_usage_error(run_twistd("sesscache", *files_args(tls_files), "--idle-timeout", "5"), "--idle-timeout")

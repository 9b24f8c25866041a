"""ALPN on every listener: the server's preference, and no aborted handshake when nothing overlaps."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
from twisted.internet import protocol
from twisted.internet.interfaces import IProtocolNegotiationFactory
from zope.interface import implementer

from tests.support import OPENSSL, PEER_TIMEOUT, InfoProtocol, ReactorThread, TLSFiles, tls_server
from twisted_sesscache import SessionCache
from twisted_sesscache.certs import certificate_options
from twisted_sesscache.exceptions import ConfigurationError
from twisted_sesscache.server.alpn import choose, parse_alpn
from twisted_sesscache.server.creator import SessionServerCreator


def alpn_handshake(port: int, offer: str, tls: str = "1.3", servername: str | None = None) -> tuple[bool, str | None]:
    """``openssl s_client -alpn OFFER``: (handshake completed, protocol the server chose)."""
    command = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", f"-tls{tls.replace('.', '_')}", "-alpn", offer]
    if servername is not None:
        command += ["-servername", servername]
    done = subprocess.run(command, input=b"", capture_output=True, timeout=PEER_TIMEOUT, check=False)
    output = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    completed = re.search(r"^New, TLSv1\.[23], Cipher is (?!\(NONE\))", output, re.MULTILINE) is not None
    chosen = re.search(r"^ALPN protocol: (.+)$", output, re.MULTILINE)
    return completed and "alert internal error" not in output, chosen.group(1).strip() if chosen else None


@implementer(IProtocolNegotiationFactory)
class Negotiating(protocol.Factory):
    protocol = InfoProtocol

    def __init__(self, protocols: list[bytes]) -> None:
        self.protocols = protocols

    def acceptableProtocols(self) -> list[bytes]:
        return self.protocols


# -- the option ---------------------------------------------------------------------------


def test_parse_alpn_keeps_order_and_drops_duplicates() -> None:
    assert parse_alpn("h2,http/1.1") == (b"h2", b"http/1.1")
    assert parse_alpn(" h2 , http/1.1,h2") == (b"h2", b"http/1.1")
    assert parse_alpn("") == ()
    assert parse_alpn([b"h2", "http/1.1"]) == (b"h2", b"http/1.1")
    assert parse_alpn("x" * 255) == (b"x" * 255,)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("h2,,http/1.1", "empty protocol name"),
        ("h2,", "empty protocol name"),
        ("x" * 256, "longer than 255 bytes"),
        ("h\u00e9", "not printable ASCII"),
        ("h2\x00", "not printable ASCII"),
        (",".join(f"{i:0>250}" for i in range(262)), "longer than ALPN's 65535 bytes"),
    ],
)
def test_parse_alpn_refuses(value: str, reason: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_alpn(value, setting="alpn")
    assert caught.value.setting == "alpn" and reason in caught.value.message
    assert "\n" not in str(caught.value)


def test_choose_is_the_servers_preference() -> None:
    assert choose([b"http/1.1", b"h2"], [b"h2", b"http/1.1"]) == b"h2"
    assert choose([b"http/1.1"], [b"h2", b"http/1.1"]) == b"http/1.1"
    assert choose([b"foo"], [b"h2"]) is None
    assert choose([b"foo"], []) is None


# -- real handshakes ------------------------------------------------------------------------


def creator_for(files: TLSFiles, alpn: tuple[bytes, ...] = (), **options: Any) -> SessionServerCreator:
    return SessionServerCreator(SessionCache().server, certificate_options(files.certificate, files.private_key, **options), alpn)


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
@pytest.mark.parametrize("offer", ["foo", "h2,http/1.1", "http/1.1"])
def test_no_overlap_continues_without_alpn(
    reactor_thread: ReactorThread, tls_files: TLSFiles, offer: str, tls: str
) -> None:
    """A factory that declares nothing (twistd portforward's) still lets ALPN clients in."""
    with tls_server(reactor_thread, creator_for(tls_files)) as port:
        assert alpn_handshake(port, offer, tls) == (True, None)


def test_bare_twisted_aborts_without_overlap(reactor_thread: ReactorThread, tls_files: TLSFiles) -> None:
    """The bug this module exists for: if Twisted stops aborting, this test says so."""
    options = certificate_options(tls_files.certificate, tls_files.private_key)
    with tls_server(reactor_thread, options) as port:
        assert alpn_handshake(port, "foo") == (False, None)


def test_factory_protocols_negotiate(reactor_thread: ReactorThread, tls_files: TLSFiles) -> None:
    factory = Negotiating([b"h2", b"http/1.1"])
    with tls_server(reactor_thread, creator_for(tls_files), factory) as port:
        assert alpn_handshake(port, "http/1.1,h2") == (True, "h2")
        assert alpn_handshake(port, "http/1.1") == (True, "http/1.1")
        assert alpn_handshake(port, "foo") == (True, None)


def test_configured_and_twisted_lists_negotiate(reactor_thread: ReactorThread, tls_files: TLSFiles) -> None:
    with tls_server(reactor_thread, creator_for(tls_files, (b"h2",))) as port:
        assert alpn_handshake(port, "http/1.1,h2") == (True, "h2")
        assert alpn_handshake(port, "http/1.1") == (True, None)
    with tls_server(reactor_thread, creator_for(tls_files, acceptableProtocols=[b"spdy/3", b"http/1.1"])) as port:
        assert alpn_handshake(port, "http/1.1,spdy/3") == (True, "spdy/3")


# -- the twistd option and the endpoint parameter ---------------------------------------------------


def test_twistd_refuses_bad_alpn_lists(tls_files: TLSFiles) -> None:
    from tests.test_tap import assert_usage_error, files_args, run_twistd

    for value in ("h2,,http/1.1", "x" * 256, "h\u00e9"):
        done = run_twistd("-n", "--pidfile=", "sesscache", "--listen", "tcp:0:interface=127.0.0.1",
                          *files_args(tls_files), "--alpn", value)
        assert_usage_error(done, "--alpn")


def test_endpoint_alpn_parameter(reactor_thread: ReactorThread, tls_files: TLSFiles) -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    from tests.test_endpoints import description

    with pytest.raises(ValueError, match="^sesscache endpoint: alpn: empty protocol name"):
        serverFromString(reactor, description(tls_files, alpn="h2,"))
    endpoint = serverFromString(reactor, description(tls_files, alpn="foo,http/1.1"))
    port = reactor_thread.call(endpoint.listen, protocol.Factory.forProtocol(InfoProtocol))
    try:
        number = port.getHost().port
        assert alpn_handshake(number, "http/1.1,foo") == (True, "foo")
        assert alpn_handshake(number, "h2") == (True, None)
    finally:
        reactor_thread.call(port.stopListening)

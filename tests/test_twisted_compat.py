"""Each Twisted private name the package uses still exists and behaves as relied on.

One test per entry of ``twisted_sesscache._twisted_compat``, against the
installed Twisted: an upgrade that moves one of them fails here, by name.
"""

from __future__ import annotations

from typing import Any

import pytest
from OpenSSL import SSL
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import ClientCreator, Factory, Protocol
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)

from tests.support import ReactorThread, TLSFiles
from twisted_sesscache import _twisted_compat as compat
from twisted_sesscache.certs import load_certificate
from twisted_sesscache.trust import trust_fingerprint


def test_trust_root_from_certificates_keeps_its_cas(tls_files: TLSFiles) -> None:
    (certificate,) = load_certificate(tls_files.certificate)
    root = trustRootFromCertificates([Certificate(certificate)])
    assert isinstance(root, compat.OpenSSLCertificateAuthorities)
    found = compat.ca_certificates(root)
    assert found is not None and len(found) == 1
    assert found[0].digest("sha256") == certificate.digest("sha256")
    assert trust_fingerprint(root).startswith("trust=ca:")
    assert compat.IOpenSSLTrustRoot.providedBy(root)


def test_platform_trust_is_told_apart() -> None:
    root = platformTrust()
    assert isinstance(root, compat.OpenSSLDefaultPaths)
    assert compat.is_platform_trust(root) and compat.ca_certificates(root) is None
    assert trust_fingerprint(root) == "trust=platform"
    assert compat.IOpenSSLTrustRoot.providedBy(root)
    assert not compat.is_platform_trust(object()) and compat.ca_certificates(object()) is None


@pytest.mark.parametrize(
    ("name", "spelled"),
    [("example.com", b"example.com"), ("bücher.example", b"xn--bcher-kva.example"), ("Example.COM", b"Example.COM")],
)
def test_idna_bytes_is_what_client_tls_options_verifies(name: str, spelled: bytes) -> None:
    assert compat.idna_bytes(name) == spelled
    assert compat.hostname_of(optionsForClientTLS(name)) == spelled.decode("ascii")


def test_hostname_of_other_creators_is_unknown() -> None:
    assert compat.hostname_of(CertificateOptions()) is None
    assert compat.hostname_of(object()) is None


def test_certificate_options_behind_options_for_client_tls(tls_files: TLSFiles) -> None:
    root = trustRootFromCertificates([Certificate(load_certificate(tls_files.certificate)[0])])
    creator = optionsForClientTLS("example.com", trustRoot=root, acceptableProtocols=[b"h2", b"http/1.1"])
    options = compat.certificate_options_of(creator)
    assert isinstance(options, CertificateOptions)
    assert options.trustRoot is root
    assert compat.acceptable_protocols(options) == (b"h2", b"http/1.1")
    # The options are the ones the creator's connections come from, not a copy.
    assert options.getContext() is options.getContext()


def test_certificate_options_of_options_and_strangers() -> None:
    options = CertificateOptions()
    assert compat.certificate_options_of(options) is options
    assert compat.certificate_options_of(object()) is None


def test_acceptable_protocols_when_none_are_declared() -> None:
    assert compat.acceptable_protocols(CertificateOptions()) == ()
    assert compat.acceptable_protocols(None) == ()
    assert compat.acceptable_protocols(CertificateOptions(acceptableProtocols=[b"h2"])) == (b"h2",)


class RefusingEndpoint:
    def listen(self, factory: Any) -> defer.Deferred[Any]:
        return defer.fail(CannotListenError("127.0.0.1", 1, OSError("in use")))


def test_raise_synchronously_makes_start_up_fail() -> None:
    plain = StreamServerEndpointService(RefusingEndpoint(), Factory())
    logged: list[Any] = []
    from twisted.python import log

    log.addObserver(logged.append)
    try:
        plain.privilegedStartService()  # without the switch: logged, start-up goes on
    finally:
        log.removeObserver(logged.append)
    assert any(event.get("isError") for event in logged)

    strict = StreamServerEndpointService(RefusingEndpoint(), Factory())
    assert compat.raise_synchronously(strict) is strict
    with pytest.raises(CannotListenError):
        strict.privilegedStartService()


def test_unexpected_eof_is_what_twisted_treats_as_a_clean_close() -> None:
    from twisted.protocols.tls import _representsEOF

    assert _representsEOF(SSL.Error(compat.UNEXPECTED_EOF))
    assert not _representsEOF(SSL.Error([("SSL routines", "", "bad record mac")]))



class Forwarding:
    """A transport wrapper as ProtocolWrapper is one: unknown names come from the transport under it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.written: list[bytes] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_write_now_sends_at_once_and_keeps_the_order(reactor_thread: ReactorThread) -> None:
    """An idle TCP transport sends at once; one with bytes waiting queues behind them; TLS is never bypassed."""
    received = bytearray()
    everything = defer.Deferred[None]()

    class Collect(Protocol):
        def dataReceived(self, data: bytes) -> None:
            received.extend(data)
            if len(received) >= len(b"now" + b"queued" + b"after"):
                everything.callback(None)

    from twisted.internet import reactor

    listen: Any = reactor.listenTCP
    port: Any = reactor_thread.call(listen, 0, Factory.forProtocol(Collect), interface="127.0.0.1")
    client = reactor_thread.call(
        ClientCreator(reactor, Protocol).connectTCP, "127.0.0.1", port.getHost().port
    )

    def write() -> tuple[bool, bool]:
        transport = client.transport
        compat.write_now(transport, b"now")
        sent_at_once = not transport._tempDataBuffer and not transport.dataBuffer
        transport.write(b"queued")
        compat.write_now(transport, b"after")  # must not overtake "queued"
        return sent_at_once, bool(transport._tempDataBuffer)

    try:
        assert reactor_thread.call(write) == (True, True)
        reactor_thread.call(lambda: everything)
        assert bytes(received) == b"nowqueuedafter"
        # A wrapper (TLS) forwards .socket and the buffers to the connection under it: it gets write().
        wrapper = Forwarding(client.transport)
        reactor_thread.call(compat.write_now, wrapper, b"wrapped")
        assert wrapper.written == [b"wrapped"]
    finally:
        reactor_thread.call(client.transport.loseConnection)
        reactor_thread.call(port.stopListening)

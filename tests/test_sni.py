"""Several certificates on one listener, chosen by SNI; sessions stay with their certificate and name."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.support import ReactorThread, s_client, tls_server
from tests.test_alpn import alpn_handshake
from twisted_sesscache import RUNTIME, SessionCache
from twisted_sesscache.certs import generate_self_signed
from twisted_sesscache.exceptions import CertificateError, ConfigurationError
from twisted_sesscache.server.sni import SNICertificates, sni_certificate_options, subject_names
from twisted_sesscache.stores.memory import MemoryStore

TLS_VERSIONS = ["1.2", "1.3"]


def combined_pem(directory: Path, hostname: str, extra: tuple[str, ...] = (), addresses: tuple[str, ...] = ()) -> Path:
    """One file holding a self-signed certificate for ``hostname`` and its key."""
    cert, key = generate_self_signed(directory / hostname, hostname, extra_names=extra, addresses=addresses)
    path = directory / f"{hostname}.pem"
    path.write_bytes(cert.read_bytes() + key.read_bytes())
    return path


@pytest.fixture(scope="module")
def two_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """a.test (also www.a.test, 127.0.0.1) first, so it is the default; then b.test."""
    directory = tmp_path_factory.mktemp("sni")
    return [
        combined_pem(directory, "a.test", ("www.a.test",), ("127.0.0.1",)),
        combined_pem(directory, "b.test", ("*.b.test",)),
    ]


def served_name(port: int, server_name: str | None) -> str:
    """The common name of the certificate the server presents for ``server_name``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    subject = x509.load_der_x509_certificate(der).subject
    return str(subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def second_connection(port: int, tmp: Path, tls: str, first: str | None, second: str | None) -> tuple[str, str]:
    """Two s_client runs: the first under ``first`` saves its session, the second offers it under ``second``."""
    session = tmp / f"session-{tls}-{first}-{second}.pem"
    session.unlink(missing_ok=True)

    def name(value: str | None) -> dict[str, object]:
        return {"servername": value} if value else {"extra": ("-noservername",)}

    made = s_client(port, tls=tls, sess_out=session, **name(first))  # type: ignore[arg-type]
    again = s_client(port, tls=tls, sess_in=session, **name(second))  # type: ignore[arg-type]
    return made, again


def test_names_come_from_subject_alt_name(two_files: list[Path]) -> None:
    options = sni_certificate_options(two_files)
    assert [key.names for key in options.keys] == [("a.test", "www.a.test", "127.0.0.1"), ("b.test", "*.b.test")]
    assert subject_names(options.keys[0].chain[0]) == options.keys[0].names


def test_each_name_gets_its_certificate(reactor_thread: ReactorThread, two_files: list[Path]) -> None:
    cache = SessionCache()
    creator = cache.server_context_factory(sni_certificate_options(two_files))
    with tls_server(reactor_thread, creator) as port:
        assert served_name(port, "b.test") == "b.test"
        assert served_name(port, "B.Test.") == "b.test"
        assert served_name(port, "api.b.test") == "b.test"  # the wildcard
        assert served_name(port, "www.a.test") == "a.test"
        assert served_name(port, "unknown.test") == "a.test"  # the first file
        assert served_name(port, None) == "a.test"
        # ALPN clients pass through every certificate's context.
        assert alpn_handshake(port, "h2,http/1.1", servername="b.test") == (True, None)
    # One cache manages them all: the default, then one per (certificate, name).
    assert reactor_thread.call(cache.stats)["contexts"] == 1 + 3 + 2


@pytest.mark.parametrize("tls", TLS_VERSIONS)
def test_sessions_resume_only_under_their_certificate_and_name(
    reactor_thread: ReactorThread, two_files: list[Path], tmp_path: Path, tls: str
) -> None:
    cache = SessionCache()
    creator = cache.server_context_factory(sni_certificate_options(two_files))
    with tls_server(reactor_thread, creator) as port:
        results = {
            (first, second): second_connection(port, tmp_path, tls, first, second)
            for first, second in [
                ("a.test", "a.test"),
                ("b.test", "b.test"),
                (None, None),
                ("b.test", "a.test"),  # another certificate
                ("a.test", "b.test"),
                ("a.test", "www.a.test"),  # same certificate, another name
                ("a.test", "unknown.test"),  # another name, served by the same default certificate
                (None, "a.test"),
            ]
        }
    print(tls, results)
    assert all(made == "New" for made, _ in results.values())
    resumed = {pair for pair, (_, again) in results.items() if again == "Reused"}
    assert resumed == {("a.test", "a.test"), ("b.test", "b.test"), (None, None)}
    stats = reactor_thread.call(cache.stats)
    assert stats["hits"] == 3 and stats["accept_good"] == 16
    if not RUNTIME.shared:
        # Observed from handshakes: each refused offer is a miss. (OpenSSL's own
        # counter leaves out sessions refused for their session-ID context.)
        assert stats["misses"] == 5


@pytest.mark.parametrize("tls", TLS_VERSIONS)
@pytest.mark.shared_only("the external session store uses OpenSSL's session callbacks, which PyPI wheels do not expose")
def test_external_store_keeps_names_apart(
    reactor_thread: ReactorThread, two_files: list[Path], tmp_path: Path, tls: str
) -> None:
    """Sessions go through the store under the listener's namespace; OpenSSL still checks the pair."""
    # No internal cache: every resumption comes from the store, through the get callback.
    cache = SessionCache("server,no-internal", store=MemoryStore())
    creator = cache.server_context_factory(sni_certificate_options(two_files))
    with tls_server(reactor_thread, creator) as port:
        assert second_connection(port, tmp_path, tls, "b.test", "b.test") == ("New", "Reused")
        assert second_connection(port, tmp_path, tls, "b.test", "a.test") == ("New", "New")
        assert second_connection(port, tmp_path, tls, "www.a.test", "a.test") == ("New", "New")
    stats = reactor_thread.call(cache.stats)
    # The store finds all three offered sessions (one namespace per listener);
    # OpenSSL resumes only the one whose (certificate, name) matches.
    assert stats["cb_hits"] == 3 and stats["hits"] == 1


def test_a_directory_stands_for_its_pem_files(two_files: list[Path]) -> None:
    options = sni_certificate_options([two_files[0].parent])
    assert isinstance(options, SNICertificates)
    assert [key.path.name for key in options.keys] == ["a.test.pem", "b.test.pem"]


def test_overlapping_names_are_refused(tmp_path: Path, two_files: list[Path]) -> None:
    other = combined_pem(tmp_path, "c.test", ("www.a.test",))
    with pytest.raises(ConfigurationError) as caught:
        sni_certificate_options([two_files[0], other])
    assert caught.value.setting == "certificate"
    assert "'www.a.test' is in both" in str(caught.value) and "c.test.pem" in str(caught.value)


def test_addresses_overlap_too(tmp_path: Path) -> None:
    first = combined_pem(tmp_path, "x.test", addresses=("127.0.0.1",))
    second = combined_pem(tmp_path, "y.test", addresses=("127.0.0.1",))
    with pytest.raises(ConfigurationError, match="'127.0.0.1' is in both"):
        sni_certificate_options([first, second])


def test_unusable_files(tmp_path: Path, two_files: list[Path]) -> None:
    cert_only = tmp_path / "cert-only.pem"
    cert_only.write_bytes(two_files[0].read_bytes().split(b"-----BEGIN PRIVATE KEY-----")[0])
    with pytest.raises(CertificateError, match="private key"):
        sni_certificate_options([cert_only])
    mismatched = tmp_path / "mismatched.pem"
    mismatched.write_bytes(cert_only.read_bytes() + two_files[1].read_bytes().split(b"-----END CERTIFICATE-----\n")[-1])
    with pytest.raises(CertificateError, match="does not match"):
        sni_certificate_options([mismatched])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigurationError, match="holds no .pem file"):
        sni_certificate_options([empty])
    with pytest.raises(ConfigurationError, match="no certificate file given"):
        sni_certificate_options([])


# -- twistd --certificate, repeated, and the endpoint's certificates=DIR ---------------------------


def test_twistd_serves_several_certificates(two_files: list[Path], tmp_path: Path) -> None:
    from tests.support import free_port
    from tests.test_tap import twistd

    port = free_port()
    with twistd(tmp_path, "sesscache", "--listen", f"tcp:{port}:interface=127.0.0.1",
                "--certificate", str(two_files[0]), "--certificate", str(two_files[1])) as process:
        process.wait_for(port)
        assert served_name(port, "b.test") == "b.test" and served_name(port, None) == "a.test"
        assert second_connection(port, tmp_path, "1.3", "b.test", "b.test") == ("New", "Reused")
        assert second_connection(port, tmp_path, "1.2", "b.test", "a.test") == ("New", "New")


def test_twistd_refuses_bad_certificate_sets(two_files: list[Path], tmp_path: Path) -> None:
    from tests.test_tap import assert_usage_error, run_twistd

    overlapping = combined_pem(tmp_path, "c.test", ("b.test",))
    cases = [
        (["--certificate", str(two_files[0]), "--certificate", str(overlapping), "--certificate", str(two_files[1])],
         "--certificate"),
        (["--certificate", str(two_files[0]), "--certificate", str(two_files[1]), "--private-key", str(two_files[0])],
         "--private-key"),
    ]
    outputs = []
    for args, option in cases:
        done = run_twistd("-n", "--pidfile=", "sesscache", "--listen", "tcp:0:interface=127.0.0.1", *args)
        assert_usage_error(done, option)
        outputs.append(done.stdout + done.stderr)
    assert "'b.test' is in both" in outputs[0] and "each file holds its own key" in outputs[1]


def test_endpoint_certificates_directory(reactor_thread: ReactorThread, two_files: list[Path], tmp_path: Path) -> None:
    from twisted.internet import protocol, reactor
    from twisted.internet.endpoints import serverFromString

    from tests.support import InfoProtocol

    directory = two_files[0].parent
    endpoint = serverFromString(reactor, f"sesscache:0:interface=127.0.0.1:certificates={directory}")
    port = reactor_thread.call(endpoint.listen, protocol.Factory.forProtocol(InfoProtocol))
    try:
        number = port.getHost().port
        assert served_name(number, "b.test") == "b.test" and served_name(number, "www.a.test") == "a.test"
        assert second_connection(number, tmp_path, "1.2", "a.test", "a.test") == ("New", "Reused")
    finally:
        reactor_thread.call(port.stopListening)
    empty = tmp_path / "empty"
    empty.mkdir()
    for text, message in [
        (f"sesscache:0:certificates={empty}", "sesscache endpoint: certificates: directory"),
        (f"sesscache:0:certificates={directory}:certificate={two_files[0]}", "sesscache endpoint: certificate: required, once"),
        (f"sesscache:0:certificates={directory}:privateKey={two_files[0]}", "sesscache endpoint: privateKey: goes with"),
    ]:
        with pytest.raises(ValueError) as raised:
            serverFromString(reactor, text)
        assert str(raised.value).startswith(message), str(raised.value)


def test_sni_contexts_offer_their_acceptable_protocols(reactor_thread: ReactorThread, two_files: list[Path]) -> None:
    creator = SessionCache().server_context_factory(sni_certificate_options(two_files, acceptableProtocols=[b"h2"]))
    with tls_server(reactor_thread, creator) as port:
        assert alpn_handshake(port, "http/1.1,h2", servername="b.test") == (True, "h2")
        assert alpn_handshake(port, "http/1.1", servername="a.test") == (True, None)

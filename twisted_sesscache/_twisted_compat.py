"""Every use of a Twisted private name in the package, each with why, in one module.

Twisted offers no public way to do these few things; each is pinned by
``tests/test_twisted_compat.py`` on the installed Twisted, so that an upgrade
that moves one fails there, by name, rather than somewhere in a handshake.
Importing this module opens nothing and installs no reactor. (pyOpenSSL's
private names live in ``twisted_sesscache._openssl``, not here.)
"""

from __future__ import annotations

from typing import Any, TypeVar

# Why: the classes trustRootFromCertificates() and platformTrust() return are
# public behaviour in a private module; the client side tells them apart to
# fingerprint a trust root into its session keys.
from twisted.internet._sslverify import OpenSSLCertificateAuthorities, OpenSSLDefaultPaths

# Why: the interface every trust root optionsForClientTLS() takes provides;
# public role, private module; for type hints where a trust root is passed.
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet import tcp
from twisted.internet.ssl import CertificateOptions

_Service = TypeVar("_Service")

# Why: OpenSSL 3's reason for a peer that closes without close_notify. Twisted's
# private tls._representsEOF turns an SSL.Error whose last reason starts with
# "unexpected eof" into a clean ConnectionLost; raising this one queue gets the
# same treatment for a truncation the package itself reports.
UNEXPECTED_EOF = [("SSL routines", "", "unexpected eof while reading")]


def ca_certificates(trust_root: Any) -> list[Any] | None:
    """The CA certificates of a trustRootFromCertificates() root, None for any other trust root.

    Why: OpenSSLCertificateAuthorities keeps them in ``_caCerts`` only; the
    client-session key must change when the trusted CAs do.
    """
    if isinstance(trust_root, OpenSSLCertificateAuthorities):
        return list(trust_root._caCerts)
    return None


def is_platform_trust(trust_root: Any) -> bool:
    """Whether ``trust_root`` is what platformTrust() returns (the system's default paths)."""
    return isinstance(trust_root, OpenSSLDefaultPaths)


def idna_bytes(name: str) -> bytes:
    """A host name as Twisted (and service-identity) spell it: IDNA, bytes.

    Why: ``twisted.internet._idna._idnaBytes`` is the transcoding that
    ClientTLSOptions verifies against; session keys must use the same one.
    """
    from twisted.internet._idna import _idnaBytes

    return _idnaBytes(name)


def hostname_of(creator: Any) -> str | None:
    """The ASCII host name an optionsForClientTLS() creator verifies, or None for other creators.

    Why: ClientTLSOptions keeps it in ``_hostnameASCII`` only; the client side
    must key sessions by the very name the certificate is checked against.
    """
    hostname = getattr(creator, "_hostnameASCII", None)
    return hostname if isinstance(hostname, str) else None


def certificate_options_of(creator: Any) -> CertificateOptions | None:
    """The CertificateOptions behind an optionsForClientTLS() creator, the creator if it is one, else None.

    Why: ClientTLSOptions is built from ``CertificateOptions._makeTLSConnection``
    and keeps it as ``_createConnection``; its ``__self__`` is the only way to
    the trust root and ALPN list that must separate client sessions.
    """
    if isinstance(creator, CertificateOptions):
        return creator
    owner = getattr(getattr(creator, "_createConnection", None), "__self__", None)
    return owner if isinstance(owner, CertificateOptions) else None


def acceptable_protocols(options: Any) -> tuple[bytes, ...]:
    """The ALPN protocols a CertificateOptions offers (empty when none or not a CertificateOptions).

    Why: CertificateOptions keeps ``acceptableProtocols`` as
    ``_acceptableProtocols`` only; sessions made under different ALPN lists
    must not be offered for one another.
    """
    return tuple(getattr(options, "_acceptableProtocols", None) or ())


def raise_synchronously(service: _Service) -> _Service:
    """Make a StreamServerEndpointService raise a failure to listen from startService; returns it.

    Why: ``_raiseSynchronously`` is how ``twisted.application.strports.service``
    makes ``twistd`` stop with the error instead of logging it and running on
    without a listener; there is no public switch.
    """
    service._raiseSynchronously = True  # type: ignore[attr-defined]
    return service


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sent at once when nothing waits to be sent before it.

    Why: a TCP transport's ``write`` only buffers; the bytes leave on the
    reactor's next turn, after registering for writability and before
    unregistering again. A Redis request made inside a handshake then waits for
    every other event of this turn, and costs the epoll round trip. With
    nothing buffered (``_tempDataBuffer``, ``dataBuffer`` past ``offset``) the
    order of bytes is kept by sending directly on ``socket``; whatever the
    socket does not take goes the usual way. Only a plain TCP connection: a
    wrapper such as TLS forwards ``socket`` to the connection under it.
    """
    if (
        type(transport) is not tcp.Client
        or not transport.connected
        or transport._tempDataBuffer
        or len(transport.dataBuffer) > transport.offset
    ):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except OSError:
        sent = 0  # EAGAIN, or an error the transport finds and reports on its own turn
    if sent < len(data):
        transport.write(data[sent:])


__all__ = [
    "UNEXPECTED_EOF",
    "IOpenSSLTrustRoot",
    "OpenSSLCertificateAuthorities",
    "OpenSSLDefaultPaths",
    "acceptable_protocols",
    "ca_certificates",
    "certificate_options_of",
    "hostname_of",
    "idna_bytes",
    "is_platform_trust",
    "raise_synchronously",
    "write_now",
]

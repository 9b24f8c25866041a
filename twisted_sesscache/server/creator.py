"""The server connection creator Twisted takes, backed by a cache's server contexts."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from twisted_sesscache.tls.connection import WatchedConnection

if TYPE_CHECKING:
    from twisted_sesscache.server.contexts import ServerContexts


def derived_session_id_context(options: Any) -> bytes | None:
    """A session-ID context from the certificate and the verification settings.

    Stable across restarts and across processes configured alike, so that a
    shared store can resume their sessions, and different as soon as the
    certificate or the client-certificate policy differs, so that a session
    never crosses into a listener that would not have granted it.
    """
    certificate = getattr(options, "certificate", None)
    if certificate is None:
        return None
    digest = hashlib.sha256(b"twisted-sesscache session-id-context v1\0")
    digest.update(_der(certificate))
    digest.update(repr((getattr(options, "verify", None), getattr(options, "requireCertificate", None),
                        getattr(options, "verifyDepth", None))).encode())
    for ca in sorted(_der(c) for c in getattr(options, "caCerts", None) or ()):
        digest.update(hashlib.sha256(ca).digest())
    return digest.hexdigest()[:32].encode("ascii")


def _der(certificate: Any) -> bytes:
    if hasattr(certificate, "original"):  # twisted.internet.ssl.Certificate
        certificate = certificate.original
    return crypto.dump_certificate(crypto.FILETYPE_ASN1, certificate)


@implementer(IOpenSSLServerConnectionCreator)
class SessionServerCreator:
    """Makes the server ``Connection`` for each accepted TLS connection.

    The wrapped ``options`` still decide certificates, ciphers and ALPN; this
    only attaches their context to the cache and watches the connection.
    """

    def __init__(self, cache: ServerContexts, options: Any) -> None:
        self.cache = cache
        self.options = options
        self._sid_context = derived_session_id_context(options)
        if hasattr(options, "getContext"):
            # Attach now, so that add/remove/flush work before the first client.
            cache.attach(options.getContext(), self._sid_context)

    def getContext(self) -> SSL.Context:
        """For code that still asks for a context factory's context."""
        return self.cache.attach(self.options.getContext(), self._sid_context)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> WatchedConnection:
        if IOpenSSLServerConnectionCreator.providedBy(self.options):
            connection = self.options.serverConnectionForTLS(tlsProtocol)
        else:
            connection = SSL.Connection(self.options.getContext(), None)
        self.cache.attach(connection.get_context(), self._sid_context)
        return self.cache.watch(connection)

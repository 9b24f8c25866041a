"""The server connection creator Twisted takes, backed by a cache's server contexts."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from twisted_sesscache.server.alpn import install_alpn, protocols_for

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

    The wrapped ``options`` still decide certificates and ciphers; this
    attaches their contexts to the cache, watches the connection, and gives
    each context the ALPN callback that continues without ALPN when nothing
    overlaps (server/alpn.py). ``alpn``: protocols offered besides those the
    protocol factory declares. Options with an ``attach_to(cache)`` method
    (several certificates chosen by SNI, server/sni.py) attach their contexts
    themselves.
    """

    def __init__(self, cache: ServerContexts, options: Any, alpn: Sequence[bytes] = ()) -> None:
        self.cache = cache
        self.options = options
        self._creates_connections = IOpenSSLServerConnectionCreator.providedBy(options)
        self._sid_context = derived_session_id_context(options)
        # Before the first connection: pyOpenSSL 25+ refuses to change a used context.
        preference = protocols_for(alpn, options)
        for context in self._attach(cache, options):
            install_alpn(context, preference)

    def _attach(self, cache: ServerContexts, options: Any) -> list[SSL.Context]:
        """Attach now, so that add/remove/flush work before the first client."""
        attach_to = getattr(options, "attach_to", None)
        if attach_to is not None:
            return list(attach_to(cache))
        if hasattr(options, "getContext"):
            return [cache.attach(options.getContext(), self._sid_context)]
        return []

    def getContext(self) -> SSL.Context:
        """For code that still asks for a context factory's context."""
        return self.cache.attach(self.options.getContext(), self._sid_context)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        if self._creates_connections:
            connection = self.options.serverConnectionForTLS(tlsProtocol)
        else:
            connection = SSL.Connection(self.options.getContext(), None)
        watched: Any = self.cache.watch(connection, self._sid_context)  # stands in for the SSL.Connection
        return watched

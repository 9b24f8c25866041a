"""The proxy's upstream leg over TLS: what it verifies, what it presents, and whether it resumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import PrivateCertificate, optionsForClientTLS, platformTrust

from twisted_sesscache.cache import SessionCache
from twisted_sesscache.exceptions import CertificateError, ConfigurationError
from twisted_sesscache.modes import CacheMode
from twisted_sesscache.trust import load_client_certificate, load_trust_root


@dataclass(frozen=True)
class UpstreamTLS:
    """``--upstream-tls`` and its companions, loaded and checked."""

    hostname: str
    port: int | None
    trust_root: Any
    client_certificate: PrivateCertificate | None

    @classmethod
    def load(
        cls,
        upstream: str,
        hostname: str | None,
        ca: str | None,
        certificate: str | None,
        private_key: str | None,
    ) -> UpstreamTLS:
        """From the option values; ConfigurationError names ``upstream_*`` settings."""
        port = None
        host_and_port = tcp_host_and_port(upstream)
        if host_and_port is not None:
            hostname, port = hostname or host_and_port[0], host_and_port[1]
        if not hostname:
            raise ConfigurationError("upstream_hostname", "is required when --upstream is not tcp:HOST:PORT")
        try:
            trust = load_trust_root(ca) if ca else platformTrust()
        except CertificateError as error:
            raise ConfigurationError("upstream_ca", str(error)) from None
        client_certificate = None
        if certificate:
            try:
                client_certificate = load_client_certificate(certificate, private_key)
            except CertificateError as error:
                blamed = "upstream_private_key" if private_key and "key" in str(error) else "upstream_certificate"
                raise ConfigurationError(blamed, str(error)) from None
        elif private_key:
            raise ConfigurationError("upstream_private_key", "needs --upstream-certificate")
        return cls(hostname, port, trust, client_certificate)

    def creator(self, cache: SessionCache) -> IOpenSSLClientConnectionCreator:
        """Verifies the backend; resumes its sessions when the cache mode has the client bit."""
        if cache.mode & CacheMode.CLIENT:
            return cache.client_creator(
                self.hostname, trust_root=self.trust_root, client_certificate=self.client_certificate, port=self.port
            )
        return optionsForClientTLS(self.hostname, trustRoot=self.trust_root, clientCertificate=self.client_certificate)


def tcp_host_and_port(description: str) -> tuple[str, int] | None:
    """Host and port of a ``tcp:HOST:PORT`` (or ``host=``/``port=``) client endpoint string."""
    kind, _, rest = description.partition(":")
    if kind.strip().lower() not in ("tcp", "tcp6"):
        return None
    positional, named = [], {}
    for part in rest.split(":"):
        key, equals, value = part.partition("=")
        if equals:
            named[key] = value
        else:
            positional.append(part)
    host = named.get("host") or (positional[0] if positional else None)
    port = named.get("port") or (positional[1] if len(positional) > 1 else None)
    if not host or not port or not port.isdigit():
        return None
    return host, int(port)


__all__ = ["UpstreamTLS", "tcp_host_and_port"]

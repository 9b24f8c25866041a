"""What must match before a session learned on one client connection is offered on another.

A session resumed under other settings would skip checks the new connection
asked for (another trust store, another client certificate) or fail outright
(another ALPN list or version range), so the key holds every setting that
changes what a full handshake would have accepted or sent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TypeAlias

from OpenSSL import SSL
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.protocols.tls import TLSMemoryBIOProtocol

from twisted_sesscache._twisted_compat import idna_bytes
from twisted_sesscache.trust import fingerprint, trust_fingerprint

# The context options that limit protocol versions: part of the key, read once
# per context when it is prepared (the bundled runtime cannot read them later).
VERSION_OPTIONS = (
    SSL.OP_NO_SSLv2
    | SSL.OP_NO_SSLv3
    | SSL.OP_NO_TLSv1
    | SSL.OP_NO_TLSv1_1
    | SSL.OP_NO_TLSv1_2
    | getattr(SSL, "OP_NO_TLSv1_3", 0)
)
_DIGEST_LABEL = b"twisted-sesscache client key v1\0"

TrustRoot: TypeAlias = object
"""What callers may pass as ``trust_root``: anything ``optionsForClientTLS`` takes (a
``Certificate``, an ``IOpenSSLTrustRoot``), a PEM file or directory path, or None (the
platform's trust store when making a creator). ``object``, because Twisted's
``IOpenSSLTrustRoot`` lives in the private ``twisted.internet._sslverify``."""


@dataclass(frozen=True)
class SessionKey:
    """Everything that must match before a session learned on one connection is offered on another."""

    hostname: str
    """The name the server's certificate was verified against (IDNA ASCII or an IP address)."""
    server_name: str | None
    """The SNI actually sent, or None."""
    port: int | None
    alpn: tuple[bytes, ...]
    settings: str
    """Digest of trust roots, verification mode and depth, client certificate,
    protocol version limits, cipher list, the creator's type and any extra key."""

    def __str__(self) -> str:
        return (
            f"{self.hostname}:{self.port} sni={self.server_name} alpn={list(self.alpn)} settings={self.settings[:12]}"
        )


def creator_settings(creator_type: type, trust_root: object, extra_key: Hashable) -> str:
    """The part of the settings fixed when a creator is wrapped: its type, trust roots, extra key."""
    return "\0".join((creator_type.__qualname__, trust_fingerprint(trust_root), repr(extra_key)))


def settings_digest(fixed: str, context: SSL.Context, connection: SSL.Connection, versions: int) -> str:
    """The key's ``settings``: ``fixed`` plus what the context and its first connection say.

    Computed once per context (the caller keeps it): verification, the
    version limits read when the context was prepared, the client
    certificate, the cipher list.
    """
    local = connection.get_certificate()
    digest = hashlib.sha256(_DIGEST_LABEL)
    for part in (
        fixed,
        f"verify={context.get_verify_mode()}/{context.get_verify_depth()}",
        f"versions={versions:#x}",
        "client=" + (fingerprint(local) if local is not None else "none"),
        "ciphers=" + ":".join(connection.get_cipher_list()),
    ):
        digest.update(part.encode("utf-8", "backslashreplace") + b"\0")
    return digest.hexdigest()


def connection_alpn(tls_protocol: TLSMemoryBIOProtocol, static: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """The ALPN list Twisted sets on this connection (as ``protosFromProtocol`` computes it)."""
    wrapped = getattr(getattr(tls_protocol, "factory", None), "wrappedFactory", None)
    negotiation = IProtocolNegotiationFactory(wrapped, None)
    if negotiation is None:
        return static
    return tuple(negotiation.acceptableProtocols()) + static


def ascii_host(hostname: str) -> str:
    """The spelling service-identity verifies: IDNA for names, the address itself for IPs."""
    from twisted.internet.abstract import isIPAddress, isIPv6Address

    if isIPAddress(hostname) or isIPv6Address(hostname):
        return hostname
    return idna_bytes(hostname).decode("ascii")


__all__ = ["VERSION_OPTIONS", "SessionKey", "TrustRoot", "ascii_host", "connection_alpn", "creator_settings", "settings_digest"]

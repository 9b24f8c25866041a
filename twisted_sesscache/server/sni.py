"""Several certificates on one listener, chosen by the client's server name (SNI).

Each PEM file holds one certificate, its chain and its key; the names a
certificate serves come from its subjectAltName (DNS names, wildcards, IP
addresses). The first file serves clients that send no name or a name no
certificate lists. Two files claiming one name are refused at start.

Sessions and server names (RFC 6066 section 3: a session resumes only under
the name it was made for). OpenSSL looks the offered session up *before* it
calls the servername callback, and keeps storing sessions in the cache of the
context the connection was created from (design.md, fact 11). A context
switched in that callback therefore comes too late: sessions would carry the
first context's session-ID context and resume under any certificate and any
name (measured: every cross-name and cross-certificate resumption succeeded,
TLS 1.2 and 1.3). So the context is chosen from the ClientHello *before*
OpenSSL reads it (:class:`SNIConnection`), and every (certificate, name) pair
has a context of its own with a session-ID context of its own: OpenSSL's own
check that a session's session-ID context matches then refuses a session made
under another certificate or another name, and the client gets a full
handshake, counted as a miss. The servername callback stays on every context,
so that OpenSSL acknowledges the name and records it in new sessions.

Limits: names one wildcard covers share that wildcard's sessions, and names
no certificate lists share the first certificate's unnamed sessions (a
context per name a client may invent would be unbounded).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import CertificateOptions
from zope.interface import implementer

from twisted_sesscache.certs import load_certificate, load_private_key
from twisted_sesscache.exceptions import CertificateError, ConfigurationError
from twisted_sesscache.tls.clienthello import ClientHelloError, parse_client_hello

if TYPE_CHECKING:
    from twisted_sesscache.server.contexts import ServerContexts

SETTING = "certificate"


@dataclass(frozen=True)
class CertifiedKey:
    """One PEM file's certificate chain and key, and the names the certificate serves."""

    path: Path
    chain: tuple[crypto.X509, ...]
    key: crypto.PKey
    names: tuple[str, ...]  # lower-case DNS names ("*.example.org" too) and IP addresses


def subject_names(certificate: crypto.X509) -> tuple[str, ...]:
    """The DNS names and IP addresses in a certificate's subjectAltName, normalised."""
    try:
        extension = certificate.to_cryptography().extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    dns = (normal_name(name) for name in extension.value.get_values_for_type(x509.DNSName))
    addresses = (str(address) for address in extension.value.get_values_for_type(x509.IPAddress))
    return tuple(dict.fromkeys((*dns, *addresses)))


def normal_name(name: str) -> str:
    """DNS names compare without case and without a final dot; IP literals in canonical form."""
    name = name.strip().rstrip(".").lower()
    try:
        return str(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return name


def load_certified_key(
    path: str | os.PathLike[str], passphrase_file: str | os.PathLike[str] | None = None
) -> CertifiedKey:
    """One file holding a chain and its key; a key that does not match is refused."""
    chain = load_certificate(path)
    key = load_private_key(path, passphrase_file=passphrase_file)
    probe = SSL.Context(SSL.TLS_METHOD)
    try:
        probe.use_certificate(chain[0])
        probe.use_privatekey(key)
        probe.check_privatekey()
    except SSL.Error:
        raise CertificateError(f"private key in {str(path)!r} does not match its certificate") from None
    names = subject_names(chain[0])
    if not names:
        raise CertificateError(f"certificate {str(path)!r} names no DNS name or IP address in its subjectAltName")
    return CertifiedKey(Path(path), tuple(chain), key, names)


def certificate_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files as given, a directory standing for the ``*.pem`` files in it (sorted by name)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix == ".pem" and p.is_file())
            if not found:
                raise ConfigurationError(SETTING, f"directory {str(path)!r} holds no .pem file")
            files += found
        else:
            files.append(path)
    if not files:
        raise ConfigurationError(SETTING, "no certificate file given")
    return files


def check_names(keys: Sequence[CertifiedKey]) -> None:
    """Refuse a name that two files claim: which certificate would serve it?"""
    owner: dict[str, Path] = {}
    for key in keys:
        for name in key.names:
            if name in owner and owner[name] != key.path:
                raise ConfigurationError(
                    SETTING, f"name {name!r} is in both {str(owner[name])!r} and {str(key.path)!r}; give each name to one file"
                )
            owner[name] = key.path


def _sid(namespace: bytes, certificate: crypto.X509, name: str | None) -> bytes:
    """Session-ID context of one (certificate, name) pair within a listener's namespace."""
    digest = hashlib.sha256(b"twisted-sesscache sni v1\0" + namespace + b"\0")
    digest.update(crypto.dump_certificate(crypto.FILETYPE_ASN1, certificate))
    digest.update(b"\0" + (b"\1" + name.encode("ascii") if name is not None else b"\0"))
    return digest.hexdigest()[:32].encode("ascii")


@implementer(IOpenSSLServerConnectionCreator)
class SNICertificates:
    """A server connection creator whose connections pick their certificate by server name.

    ``SessionCache.server_context_factory`` takes it like a
    ``CertificateOptions``; its :meth:`attach_to` gives the cache every
    context at once, so that one cache manages them all.
    """

    def __init__(self, keys: Sequence[CertifiedKey], **options: Any) -> None:
        if not keys:
            raise ConfigurationError(SETTING, "no certificate file given")
        check_names(keys)
        self.keys = tuple(keys)
        # What server/alpn.py offers besides the factory's, as CertificateOptions' own list.
        self.acceptable_protocols: tuple[bytes, ...] = tuple(options.get("acceptableProtocols") or ())
        # (context, certificate, name): the first is the default, for no or unknown names.
        self._contexts: list[tuple[SSL.Context, crypto.X509, str | None]] = []
        self._by_name: dict[str, SSL.Context] = {}
        self._wildcards: dict[str, SSL.Context] = {}
        self.default = self._context(keys[0], None, options)
        for key in keys:
            for name in key.names:
                context = self._context(key, name, options)
                (self._wildcards if name.startswith("*.") else self._by_name)[name.removeprefix("*.")] = context
        # Stable for a given set of files, so that processes configured alike share a store.
        digest = hashlib.sha256(b"twisted-sesscache sni namespace v1\0")
        for key in keys:
            digest.update(crypto.dump_certificate(crypto.FILETYPE_ASN1, key.chain[0]))
        self.namespace = digest.hexdigest()[:32].encode("ascii")

    def _context(self, key: CertifiedKey, name: str | None, options: dict[str, Any]) -> SSL.Context:
        context = CertificateOptions(
            privateKey=key.key, certificate=key.chain[0], extraCertChain=list(key.chain[1:]), **options
        ).getContext()
        context.set_tlsext_servername_callback(self._on_servername)
        self._contexts.append((context, key.chain[0], name))
        return context

    @property
    def contexts(self) -> list[SSL.Context]:
        return [context for context, _, _ in self._contexts]

    def context_for(self, server_name: str | bytes | None) -> SSL.Context:
        """The context for a name the client sent: exact name, then wildcard, then the default."""
        if server_name is None:
            return self.default
        if isinstance(server_name, bytes):
            server_name = server_name.decode("ascii", "replace")
        name = normal_name(server_name)
        found = self._by_name.get(name)
        if found is None and "." in name:
            found = self._wildcards.get(name.split(".", 1)[1])
        return found or self.default

    def _on_servername(self, connection: SSL.Connection) -> None:
        """OpenSSL's callback: acknowledges the name; switches only if no hello was read first."""
        chosen = self.context_for(connection.get_servername())
        if connection.get_context() is not chosen:
            connection.set_context(chosen)

    # -- what the server creator and Twisted call ----------------------------

    def getContext(self) -> SSL.Context:
        return self.default

    def serverConnectionForTLS(self, tls_protocol: Any) -> SNIConnection:
        return SNIConnection(self)

    def attach_to(self, cache: ServerContexts) -> list[SSL.Context]:
        """Attach every context to ``cache``, each keeping a session-ID context of its own.

        The cache's own session-ID context (or this set's) names the listener,
        which an external store uses as its namespace; each context's own
        OpenSSL session-ID context is derived from it, the certificate and the
        name, so that OpenSSL refuses a session from another pair.
        """
        namespace = cache.config.session_id_context or self.namespace
        for context, certificate, name in self._contexts:
            cache.attach(context, namespace)
            context.set_session_id(_sid(namespace, certificate, name))
        return self.contexts


class SNIConnection(SSL.Connection):
    """A server connection that reads the ClientHello's server name before OpenSSL does.

    It holds the first bytes until the hello is complete, switches to the
    context for the name, then hands the bytes on. A hello that does not
    parse goes to OpenSSL as it is, which answers it with the proper alert.
    """

    def __init__(self, certificates: SNICertificates) -> None:
        super().__init__(certificates.default, None)
        self._certificates = certificates
        self._held: bytearray | None = bytearray()

    def bio_write(self, buf: bytes) -> int:
        if self._held is None:
            return super().bio_write(buf)
        self._held += buf
        try:
            hello = parse_client_hello(bytes(self._held))
        except ClientHelloError:
            hello = None
            complete = True
        else:
            complete = hello is not None
        if not complete:
            return len(buf)
        if hello is not None:
            chosen = self._certificates.context_for(hello.server_name)
            if chosen is not self.get_context():
                self.set_context(chosen)
        held, self._held = bytes(self._held), None
        super().bio_write(held)
        return len(buf)


def sni_certificate_options(
    paths: Iterable[str | os.PathLike[str]],
    passphrase_file: str | os.PathLike[str] | None = None,
    **options: Any,
) -> SNICertificates:
    """Several certificates, chosen by SNI, for ``SessionCache.server_context_factory``.

    ``paths`` are PEM files (chain and key in each) or directories of them;
    the first certificate serves clients with no or an unknown name.
    ``options`` go to each certificate's ``CertificateOptions``.
    """
    keys = [load_certified_key(path, passphrase_file) for path in certificate_files(paths)]
    return SNICertificates(keys, **options)


__all__ = [
    "CertifiedKey",
    "SNICertificates",
    "SNIConnection",
    "check_names",
    "load_certified_key",
    "sni_certificate_options",
    "subject_names",
]

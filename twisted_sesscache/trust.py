"""What a client trusts and presents, loaded from files and fingerprinted for session keys."""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

from OpenSSL import crypto

from twisted.internet.ssl import (
    Certificate,
    KeyPair,
    PrivateCertificate,
    platformTrust,
    trustRootFromCertificates,
)

from twisted_sesscache._twisted_compat import ca_certificates, is_platform_trust
from twisted_sesscache.certs import CertificateError, certificate_options, load_certificate


def resolve_trust_root(trust_root: Any) -> Any:
    """None → the platform's trust store; a path → the CA certificates in that PEM file or directory."""
    if trust_root is None:
        return platformTrust()
    if isinstance(trust_root, (str, os.PathLike)):
        return load_trust_root(trust_root)
    return trust_root


def load_trust_root(path: str | os.PathLike[str], what: str = "CA certificates") -> Any:
    """Every certificate in a PEM file, or in the PEM files of a directory; CertificateError names the path."""
    source = Path(path)
    if source.is_dir():
        found: list[crypto.X509] = []
        for entry in sorted(source.iterdir()):
            if entry.is_file():
                try:
                    found += load_certificate(entry, what)
                except CertificateError:
                    continue  # like Twisted's tls: endpoint, skip files that are not certificates
        if not found:
            raise CertificateError(f"{what} directory {str(path)!r} holds no readable PEM certificate")
    else:
        found = load_certificate(source, what)
    return trustRootFromCertificates([Certificate(c) for c in found])


def load_client_certificate(
    certificate: str | os.PathLike[str], private_key: str | os.PathLike[str] | None = None
) -> PrivateCertificate:
    """A client certificate and its key from PEM files, refusing a key that does not match."""
    options = certificate_options(certificate, private_key)
    return PrivateCertificate.fromCertificateAndKeyPair(Certificate(options.certificate), KeyPair(options.privateKey))


def trust_fingerprint(trust_root: Any) -> str:
    """What the key records of a trust root: CA fingerprints, the platform store, or this object."""
    if trust_root is None:
        return "trust=none"
    certificates = [trust_root.original] if isinstance(trust_root, Certificate) else ca_certificates(trust_root)
    if certificates is None:
        if is_platform_trust(trust_root):
            return "trust=platform"
        return f"trust=object:{type(trust_root).__qualname__}:{_token(trust_root)}"
    return "trust=ca:" + ",".join(sorted(fingerprint(c) for c in certificates))


_tokens: WeakKeyDictionary[Any, int] = WeakKeyDictionary()
_pinned: dict[int, tuple[Any, int]] = {}  # objects that cannot be weakly referenced
_counter = itertools.count(1)


def _token(thing: Any) -> int:
    """A number unique to ``thing`` for the life of the process (``id()`` can be reused)."""
    try:
        token = _tokens.get(thing)
        if token is None:
            token = _tokens[thing] = next(_counter)
        return token
    except TypeError:
        pinned = _pinned.get(id(thing))
        if pinned is None or pinned[0] is not thing:
            pinned = _pinned[id(thing)] = (thing, next(_counter))
        return pinned[1]


def fingerprint(certificate: Any) -> str:
    if hasattr(certificate, "original"):
        certificate = certificate.original
    if isinstance(certificate, crypto.X509):
        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, certificate)
    else:  # a cryptography certificate
        from cryptography.hazmat.primitives.serialization import Encoding

        der = certificate.public_bytes(Encoding.DER)
    return hashlib.sha256(der).hexdigest()

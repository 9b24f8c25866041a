"""Certificates for listeners: load and check PEM files, or make a throwaway one."""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.ssl import CertificateOptions


from twisted_sesscache.exceptions import CertificateError


def generate_self_signed(
    directory: str | os.PathLike[str],
    hostname: str = "localhost",
    key_type: str = "rsa",
    extra_names: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Write ``cert.pem`` and ``key.pem`` for ``hostname``, ``extra_names`` and 127.0.0.1, ::1."""
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif key_type == "ecdsa":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(f"key type must be 'rsa' or 'ecdsa', not {key_type!r}")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(hostname),
                    *(x509.DNSName(name) for name in extra_names),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(key_fd, "wb") as key_file:
        key_file.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CertificateError(f"cannot read {what} {str(path)!r}: {error.strerror}") from None


def load_certificate(path: str | os.PathLike[str], what: str = "certificate") -> list[crypto.X509]:
    """Every certificate in a PEM file, leaf first."""
    data = _read(path, what)
    end = b"-----END CERTIFICATE-----"
    blocks = [block + end for block in data.split(end) if b"-----BEGIN CERTIFICATE-----" in block]
    try:
        certificates = [crypto.load_certificate(crypto.FILETYPE_PEM, block) for block in blocks]
    except crypto.Error:
        certificates = []
    if not certificates:
        raise CertificateError(f"{what} {str(path)!r} holds no readable PEM certificate")
    return certificates


def load_private_key(path: str | os.PathLike[str], what: str = "private key") -> crypto.PKey:
    data = _read(path, what)
    try:
        return crypto.load_privatekey(crypto.FILETYPE_PEM, data)
    except crypto.Error:
        raise CertificateError(f"{what} {str(path)!r} holds no unencrypted PEM private key") from None


def certificate_options(
    certificate: str | os.PathLike[str],
    private_key: str | os.PathLike[str] | None = None,
    **options: object,
) -> CertificateOptions:
    """``CertificateOptions`` from PEM files, refusing a key that does not match."""
    chain = load_certificate(certificate)
    key = load_private_key(private_key if private_key is not None else certificate)
    probe = SSL.Context(SSL.TLS_METHOD)
    probe.use_certificate(chain[0])
    try:
        probe.use_privatekey(key)  # OpenSSL 3 already refuses a mismatched key here
        probe.check_privatekey()
    except SSL.Error:
        raise CertificateError(
            f"private key {str(private_key or certificate)!r} does not match "
            f"certificate {str(certificate)!r}"
        ) from None
    return CertificateOptions(
        privateKey=key,
        certificate=chain[0],
        extraCertChain=chain[1:],
        **options,  # type: ignore[arg-type]
    )

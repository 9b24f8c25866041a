"""Certificates for listeners: load and check PEM files, or make a throwaway one."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
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
    addresses: Sequence[str] = ("127.0.0.1", "::1"),
) -> tuple[Path, Path]:
    """Write ``cert.pem`` and ``key.pem`` for ``hostname``, ``extra_names`` and ``addresses``."""
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
                    *(x509.IPAddress(ipaddress.ip_address(address)) for address in addresses),
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


# A passphrase file holds one line; anything longer is not a passphrase file.
MAX_PASSPHRASE_FILE = 4096


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    """A regular file's bytes; a FIFO, device, socket or directory is refused before any open.

    Opening a FIFO blocks until a writer comes, and a device may never end:
    either would hang startup, so only the kind of file is looked at first.
    """
    try:
        kind = os.stat(path).st_mode
    except OSError as error:
        raise CertificateError(f"cannot read {what} {str(path)!r}: {error.strerror}") from None
    if not stat.S_ISREG(kind):
        raise CertificateError(f"{what} {str(path)!r} is {_kind_of(kind)}, not a regular file")
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CertificateError(f"cannot read {what} {str(path)!r}: {error.strerror}") from None


def _kind_of(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_passphrase(path: str | os.PathLike[str]) -> bytes:
    """The passphrase in ``path``: its first line, without the line end (as ``openssl -passin file:``)."""
    data = _read(path, "passphrase file")
    if len(data) > MAX_PASSPHRASE_FILE:
        raise CertificateError(f"passphrase file {str(path)!r} is longer than {MAX_PASSPHRASE_FILE} bytes")
    passphrase = data.splitlines()[0] if data else b""
    if not passphrase:
        raise CertificateError(f"passphrase file {str(path)!r} is empty")
    return passphrase


class _NoPassphrase(Exception):
    """Raised from the passphrase callback, so that OpenSSL never prompts on the terminal."""


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


def load_private_key(
    path: str | os.PathLike[str],
    what: str = "private key",
    passphrase_file: str | os.PathLike[str] | None = None,
) -> crypto.PKey:
    """The PEM private key in ``path``, decrypted with ``passphrase_file``'s passphrase if encrypted.

    Never prompts: without a passphrase file, OpenSSL would ask on the
    terminal, so a callback answers it with a clear error instead.
    """
    data = _read(path, what)
    passphrase = read_passphrase(passphrase_file) if passphrase_file is not None else None

    def answer(*_: object) -> bytes:
        if passphrase is None:
            raise _NoPassphrase()
        return passphrase

    try:
        return crypto.load_privatekey(crypto.FILETYPE_PEM, data, answer)
    except _NoPassphrase:
        raise CertificateError(
            f"{what} {str(path)!r} is encrypted: give a file holding its passphrase "
            "(twistd: --private-key-passphrase-file; endpoint: privateKeyPassphraseFile=)"
        ) from None
    except crypto.Error:
        if passphrase is not None and b"ENCRYPTED" in data:
            raise CertificateError(
                f"{what} {str(path)!r} does not open with the passphrase in {str(passphrase_file)!r}"
            ) from None
        raise CertificateError(f"{what} {str(path)!r} holds no readable PEM private key") from None


def certificate_options(
    certificate: str | os.PathLike[str],
    private_key: str | os.PathLike[str] | None = None,
    passphrase_file: str | os.PathLike[str] | None = None,
    **options: object,
) -> CertificateOptions:
    """``CertificateOptions`` from PEM files, refusing a key that does not match."""
    chain = load_certificate(certificate)
    key = load_private_key(private_key if private_key is not None else certificate, passphrase_file=passphrase_file)
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m twisted_sesscache.certs DIR [NAME ...]``: a throwaway certificate for trying things out."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        print("usage: python -m twisted_sesscache.certs DIR [NAME ...]  (writes DIR/cert.pem and DIR/key.pem,"
              " self-signed for localhost, NAMEs, 127.0.0.1 and ::1)", file=sys.stderr)
        return 1
    try:
        cert, key = generate_self_signed(args[0], extra_names=args[1:])
    except OSError as error:
        print(f"cannot write a certificate to {args[0]!r}: {error.strerror}", file=sys.stderr)
        return 1
    print(f"{cert}\n{key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

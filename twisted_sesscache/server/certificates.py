"""A listener's certificates and keys, loaded from the files a user named, each failure blamed on its setting."""

from __future__ import annotations

from collections.abc import Sequence

from OpenSSL import SSL
from twisted.internet.ssl import CertificateOptions

from twisted_sesscache.certs import certificate_options, load_certificate, load_private_key, read_passphrase
from twisted_sesscache.exceptions import CertificateError, ConfigurationError
from twisted_sesscache.server.sni import SNICertificates, sni_certificate_options

PASSPHRASE_FILE = "private_key_passphrase_file"


def server_certificate(
    certificate: str, private_key: str | None, *, tickets: bool, passphrase_file: str | None = None
) -> CertificateOptions:
    """``CertificateOptions`` from PEM files; ConfigurationError names ``certificate`` or ``private_key``."""
    key_setting = "private_key" if private_key else "certificate"
    _check_passphrase_file(passphrase_file)
    try:
        load_certificate(certificate)
    except CertificateError as error:
        raise ConfigurationError("certificate", str(error)) from None
    try:
        load_private_key(private_key if private_key is not None else certificate, passphrase_file=passphrase_file)
    except CertificateError as error:
        raise ConfigurationError(key_setting, str(error)) from None
    try:
        return certificate_options(certificate, private_key, passphrase_file, enableSessionTickets=tickets)
    except (CertificateError, SSL.Error):
        raise ConfigurationError(
            key_setting, f"private key {private_key or certificate!r} does not match certificate {certificate!r}"
        ) from None


def server_certificates(
    paths: Sequence[str], *, tickets: bool, passphrase_file: str | None = None, setting: str = "certificate"
) -> SNICertificates:
    """Several certificates chosen by SNI (server/sni.py); each file or directory holds chains and keys."""
    _check_passphrase_file(passphrase_file)
    try:
        return sni_certificate_options(paths, passphrase_file, enableSessionTickets=tickets)
    except (CertificateError, ConfigurationError) as error:
        raise ConfigurationError(setting, getattr(error, "message", str(error))) from None


def _check_passphrase_file(path: str | None) -> None:
    if path is not None:
        try:
            read_passphrase(path)
        except CertificateError as error:
            raise ConfigurationError(PASSPHRASE_FILE, str(error)) from None


__all__ = ["server_certificate", "server_certificates"]

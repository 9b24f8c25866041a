"""A listener's certificate and key, loaded from the files a user named, each failure blamed on its setting."""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet.ssl import CertificateOptions

from twisted_sesscache.certs import certificate_options, load_certificate, load_private_key
from twisted_sesscache.exceptions import CertificateError, ConfigurationError


def server_certificate(certificate: str, private_key: str | None, *, tickets: bool) -> CertificateOptions:
    """``CertificateOptions`` from PEM files; ConfigurationError names ``certificate`` or ``private_key``."""
    key_setting = "private_key" if private_key else "certificate"
    try:
        load_certificate(certificate)
    except CertificateError as error:
        raise ConfigurationError("certificate", str(error)) from None
    try:
        load_private_key(private_key if private_key is not None else certificate)
    except CertificateError as error:
        raise ConfigurationError(key_setting, str(error)) from None
    try:
        return certificate_options(certificate, private_key, enableSessionTickets=tickets)
    except (CertificateError, SSL.Error):
        raise ConfigurationError(
            key_setting, f"private key {private_key or certificate!r} does not match certificate {certificate!r}"
        ) from None


__all__ = ["server_certificate"]

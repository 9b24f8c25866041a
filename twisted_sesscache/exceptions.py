"""Every error the package raises on purpose, under one base class.

Configuration errors carry the setting they are about (``setting``, the name
``CacheConfig`` gives it), so that ``twistd sesscache`` can blame
``--session-timeout`` and the ``sesscache:`` endpoint ``timeout=`` for the
same mistake without either searching the message text.
"""

from __future__ import annotations

from collections.abc import Callable


class SessionCacheError(Exception):
    """Base class of the errors twisted-sesscache raises."""


class ConfigurationError(SessionCacheError, ValueError):
    """A setting that cannot be used; ``setting`` names it, the message says why and what would do."""

    def __init__(self, setting: str | None, message: str) -> None:
        super().__init__(message)
        self.setting = setting
        self.message = message

    def __str__(self) -> str:
        return self.spelled(lambda name: name)

    def spelled(self, spell: Callable[[str], str]) -> str:
        """The message, led by the setting as the user spelled it (``--session-timeout: ...``)."""
        if self.setting is None:
            return self.message
        return f"{spell(self.setting)}: {self.message}"


class NeedsSharedOpenSSL(ConfigurationError, RuntimeError):
    """An operation OpenSSL offers but this process's pyOpenSSL cannot reach.

    Also a ConfigurationError, so that a setting that needs it (``size``,
    ``flush_interval``) is reported under its name like any other bad setting.
    """

    def __init__(self, operation: str, openssl: str, setting: str | None = None) -> None:
        super().__init__(
            setting,
            f"{operation} needs the shared-OpenSSL runtime, but pyOpenSSL here runs on "
            f"cryptography's bundled {openssl}, which hides that part of OpenSSL. Install "
            "pyOpenSSL linked against the system libssl (Debian/Ubuntu: apt install "
            "python3-openssl python3-cryptography python3-cffi, then use a venv made with "
            "--system-site-packages), or leave this setting out.",
        )
        self.operation = operation


class CertificateError(SessionCacheError, ValueError):
    """A certificate or key that cannot be used; the message names the file."""


class KeyFileError(SessionCacheError, ValueError):
    """A sealing key file that cannot be used; the message names the path and the fix."""


class SealError(SessionCacheError, ValueError):
    """A record that does not open: wrong key, wrong context or kind, truncated, tampered, foreign."""


class UnknownKeyError(SealError):
    """A record sealed under a key this process does not hold: another fleet's, or a member's new key file."""


class ClientHelloError(SessionCacheError, ValueError):
    """The bytes are not a well-formed TLS ClientHello."""


class StoreUnavailable(SessionCacheError):
    """The store did not take the request: too many already waiting, or no connection."""


__all__ = [
    "CertificateError",
    "ClientHelloError",
    "ConfigurationError",
    "KeyFileError",
    "NeedsSharedOpenSSL",
    "SealError",
    "SessionCacheError",
    "StoreUnavailable",
    "UnknownKeyError",
]

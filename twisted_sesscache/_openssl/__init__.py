"""The one place that reaches OpenSSL below pyOpenSSL.

Which OpenSSL pyOpenSSL runs on is found out once, on first use, not at
import: importing any module of the package loads no library through cffi.
"""

from __future__ import annotations

from twisted_sesscache._openssl.access import BUNDLED, COUNTERS, SHARED, OpenSSLAccess

_detected: OpenSSLAccess | None = None


def runtime() -> OpenSSLAccess:
    """The process-wide OpenSSL access, detected on the first call."""
    global _detected
    if _detected is None:
        from twisted_sesscache._openssl.access import _open_shared

        _detected = OpenSSLAccess(_open_shared())
    return _detected


__all__ = ["BUNDLED", "COUNTERS", "SHARED", "OpenSSLAccess", "runtime"]

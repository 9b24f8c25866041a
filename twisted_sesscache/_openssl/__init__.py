"""The one place that reaches OpenSSL below pyOpenSSL.

``binding`` holds the cffi declarations and the check that the system libssl
is pyOpenSSL's; ``access`` the session-cache operations on pyOpenSSL objects;
``callbacks`` the C entry points OpenSSL calls back into. Which OpenSSL
pyOpenSSL runs on is found out once, on first use, not at import: importing
any module of the package loads no library through cffi.
"""

from __future__ import annotations

import threading

from twisted_sesscache._openssl import binding
from twisted_sesscache._openssl.access import OpenSSLAccess
from twisted_sesscache._openssl.binding import BUNDLED, COUNTERS, SHARED

_lock = threading.Lock()
_detected: OpenSSLAccess | None = None


def runtime() -> OpenSSLAccess:
    """The process-wide OpenSSL access, detected on the first call."""
    global _detected
    if _detected is None:  # the lock only for the first calls: this runs per connection
        with _lock:
            if _detected is None:
                _detected = OpenSSLAccess(binding.shared())
    return _detected


__all__ = ["BUNDLED", "COUNTERS", "SHARED", "OpenSSLAccess", "runtime"]

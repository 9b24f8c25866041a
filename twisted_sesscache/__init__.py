"""TLS session resumption for Twisted, managed through OpenSSL's session-cache API.

The public names are imported on first use, so that ``import twisted_sesscache``
(which Twisted's plugin scan does) loads neither OpenSSL nor the reactor.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from twisted_sesscache._openssl import OpenSSLAccess
    from twisted_sesscache.cache import SessionCache
    from twisted_sesscache.config import CacheConfig
    from twisted_sesscache.exceptions import ConfigurationError, NeedsSharedOpenSSL, SessionCacheError
    from twisted_sesscache.modes import CacheMode

__version__ = "0.1.0"

_PUBLIC = {
    "CacheConfig": "twisted_sesscache.config",
    "CacheMode": "twisted_sesscache.modes",
    "ConfigurationError": "twisted_sesscache.exceptions",
    "NeedsSharedOpenSSL": "twisted_sesscache.exceptions",
    "SessionCache": "twisted_sesscache.cache",
    "SessionCacheError": "twisted_sesscache.exceptions",
}


def __getattr__(name: str) -> Any:
    if name == "RUNTIME":  # the detected OpenSSL access, found out on first use
        from twisted_sesscache._openssl import runtime

        return runtime()
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'twisted_sesscache' has no attribute {name!r}")


RUNTIME: OpenSSLAccess
__all__ = ["RUNTIME", "CacheConfig", "CacheMode", "ConfigurationError", "NeedsSharedOpenSSL", "SessionCache",
           "SessionCacheError", "__version__"]

"""TLS session resumption for Twisted, managed through OpenSSL's session-cache API."""

from twisted_sesscache.cache import SessionCache
from twisted_sesscache.modes import CacheMode
from twisted_sesscache._openssl.access import NeedsSharedOpenSSL, RUNTIME

__all__ = ["CacheMode", "NeedsSharedOpenSSL", "RUNTIME", "SessionCache"]
__version__ = "0.1.0"

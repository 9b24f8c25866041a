"""Where sessions live outside OpenSSL: one small asynchronous interface, two stores.

Every call returns a Deferred and never blocks the reactor; values are opaque
(already sealed) bytes; a TTL in whole seconds bounds every record.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore


@runtime_checkable
class SessionStore(Protocol):
    """get / set with TTL / delete, as rustls' StoresServerSessions, but asynchronous."""

    def get(self, key: bytes) -> Deferred[bytes | None]: ...

    def set(self, key: bytes, value: bytes, ttl: int) -> Deferred[None]: ...

    def add(self, key: bytes, value: bytes, ttl: int) -> Deferred[bool]:
        """Set only if absent; true when this call set it (shared ticket keys: first one wins)."""

    def delete(self, key: bytes) -> Deferred[None]: ...

    def close(self) -> Deferred[None]: ...


def store_from_url(url: str, reactor: IReactorCore | None = None) -> SessionStore:
    """``memory:`` or ``redis://[:password@]host:port/db`` (``rediss://`` for TLS to Redis)."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory" or url == "memory":
        from twisted_sesscache.stores.memory import MemoryStore

        return MemoryStore()
    if scheme in ("redis", "rediss"):
        try:
            from twisted_sesscache.stores.redis import RedisStore
        except ImportError:
            raise ValueError(
                "the Redis store needs txredisapi: pip install 'twisted-sesscache[redis]' "
                "(under the shared-OpenSSL runtime: pip install --no-deps txredisapi)"
            ) from None

        return RedisStore.from_url(url, reactor)
    raise ValueError(f"unknown store {url!r}: expected 'memory' or redis://host:port/db")

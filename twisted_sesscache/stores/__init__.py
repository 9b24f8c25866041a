"""Where sessions live outside OpenSSL: stores providing ``ISessionStore``, chosen by URL."""

from __future__ import annotations

from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorTime

from twisted_sesscache.interfaces import ISessionStore


def store_from_url(url: str, reactor: IReactorTime | None = None, *, ca: str | None = None) -> ISessionStore:
    """``memory:``, ``redis://[[user]:password@]host:port/db[?ca=...&sni=...&timeout=...]``, ``rediss://``
    (TLS, the server verified against ``ca`` or the platform's roots) or
    ``redis+sentinel://host:port[,host:port]/SERVICE[/DB]``."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory" or url == "memory":
        from twisted_sesscache.stores.memory import MemoryStore

        return MemoryStore()
    if scheme in ("redis", "rediss", "redis+sentinel", "rediss+sentinel"):
        try:
            from twisted_sesscache.stores.redis import RedisStore
        except ImportError:
            raise ValueError(
                "the Redis store needs txredisapi: pip install 'twisted-sesscache[redis]' "
                "(under the shared-OpenSSL runtime: pip install --no-deps txredisapi)"
            ) from None

        return RedisStore.from_url(url, reactor, ca=ca)
    raise ValueError(f"unknown store {url!r}: expected 'memory' or redis://host:port/db")


__all__ = ["ISessionStore", "store_from_url"]

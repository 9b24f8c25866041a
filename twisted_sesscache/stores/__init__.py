"""Where sessions live outside OpenSSL: stores providing ``ISessionStore``, chosen by URL."""

from __future__ import annotations

from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorTime

from twisted_sesscache.interfaces import ISessionStore


def store_from_url(
    url: str, reactor: IReactorTime | None = None, *, ca: str | None = None, size: int | None = None
) -> ISessionStore:
    """``memory:``, ``lmdb:DIRECTORY``, ``redis://[[user]:password@]host:port/db[?ca=...&sni=...&timeout=...]``,
    ``rediss://`` (TLS, the server verified against ``ca`` or the platform's roots) or
    ``redis+sentinel://host:port[,host:port]/SERVICE[/DB]``.

    ``size`` bounds the records of an embedded store (the cache's size; 0: no limit).
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "lmdb":
        return _lmdb_store(url, size)
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
    raise ValueError(f"unknown store {url!r}: expected 'memory', lmdb:DIRECTORY or redis://host:port/db")


def _lmdb_store(url: str, size: int | None) -> ISessionStore:
    path = url.split(":", 1)[1]
    if path.startswith("//"):  # lmdb:///var/lib/x is lmdb:/var/lib/x
        path = path[2:]
    if not path:
        raise ValueError("lmdb: needs a directory (lmdb:/var/lib/sesscache/sessions)")
    try:
        from twisted_sesscache.stores.lmdb import LMDBStore
    except ImportError:
        raise ValueError(
            "the LMDB store needs the lmdb package: pip install 'twisted-sesscache[lmdb]' "
            "(Debian: apt install python3-lmdb)"
        ) from None
    return LMDBStore(path, 20480 if size is None else size)


__all__ = ["ISessionStore", "store_from_url"]

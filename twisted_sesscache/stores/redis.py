"""Sessions in Redis through txredisapi: shared by processes and hosts, never waited on."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from twisted_sesscache.exceptions import StoreUnavailable
from twisted_sesscache.interfaces import ISessionStore


@implementer(ISessionStore)
class RedisStore:
    """Bounded, time-limited Redis calls; failures are counted and reported, never raised into a handshake.

    txredisapi queues commands while it reconnects; every call here carries a
    timeout, which cancels its place in that queue, and no more than
    ``max_pending`` calls wait at once, so a dead Redis costs a counter, not memory.
    """

    log = Logger()
    shared = True

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        db: int = 0,
        password: str | None = None,
        *,
        tls: bool = False,
        prefix: bytes = b"sesscache:",
        timeout: float = 1.0,
        max_pending: int = 256,
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self._reactor: IReactorTime = reactor
        self.address = f"{host}:{port}/{db}"
        self.prefix = prefix
        self.timeout = timeout
        self.max_pending = max_pending
        self.errors = 0
        self._pending = 0
        self._down_logged = False
        ssl_factory: Any = False
        if tls:
            from twisted.internet.ssl import ClientContextFactory

            ssl_factory = ClientContextFactory()
        self._redis = txredisapi.lazyConnectionPool(
            host,
            port,
            dbid=db,
            poolsize=2,
            reconnect=True,
            charset=None,
            password=password,
            ssl_context_factory=ssl_factory,
            connectTimeout=timeout,
            replyTimeout=timeout,
            convertNumbers=False,
        )
        # Reconnect with exponential backoff, capped so that a returning Redis is found soon.
        self._redis._factory.maxDelay = 5
        self._redis._factory.noisy = False

    @classmethod
    def from_url(cls, url: str, reactor: IReactorCore | None = None, **kwargs: Any) -> RedisStore:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"not a Redis URL: {url!r}")
        try:
            db = int(parts.path.strip("/") or 0)
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"bad Redis URL {url!r}: port and database must be numbers") from None
        password = unquote(parts.password) if parts.password else None
        return cls(parts.hostname or "127.0.0.1", port, db, password, tls=parts.scheme == "rediss",
                   reactor=reactor, **kwargs)

    def _call(self, command: str, *args: Any, **kwargs: Any) -> Deferred[Any]:
        if self._pending >= self.max_pending:
            self.errors += 1
            return fail(StoreUnavailable(f"{self._pending} Redis calls already waiting"))
        try:
            result: Deferred[Any] = getattr(self._redis, command)(*args, **kwargs)
        except Exception as error:  # txredisapi raises ConnectionError when it gave up
            return self._failed(error)
        self._pending += 1
        result.addTimeout(self.timeout, self._reactor)

        def done(value: Any) -> Any:
            self._pending -= 1
            if self._down_logged:
                self._down_logged = False
                self.log.info("Redis session store at {address} answers again", address=self.address)
            return value

        def failed(failure: Any) -> Any:
            self._pending -= 1
            return self._failed(failure.value)

        result.addCallbacks(done, failed)
        return result

    def _failed(self, error: BaseException) -> Deferred[Any]:
        self.errors += 1
        if not self._down_logged:
            self._down_logged = True
            self.log.warn(
                "Redis session store at {address} failed ({error}); handshakes go on without it",
                address=self.address,
                error=f"{type(error).__name__}: {error}",
            )
        return fail(StoreUnavailable(str(error) or type(error).__name__))

    def get(self, key: bytes) -> Deferred[bytes | None]:
        return self._call("get", self.prefix + key)

    def set(self, key: bytes, value: bytes, ttl: int) -> Deferred[None]:
        if ttl <= 0:
            return self.delete(key)
        return self._call("set", self.prefix + key, value, expire=int(ttl))

    def add(self, key: bytes, value: bytes, ttl: int) -> Deferred[bool]:
        added = self._call("set", self.prefix + key, value, expire=int(ttl), only_if_not_exists=True)
        return added.addCallback(bool)

    def take(self, key: bytes) -> Deferred[bytes | None]:
        return self._call("execute_command", "GETDEL", self.prefix + key)

    def delete(self, key: bytes) -> Deferred[None]:
        return self._call("delete", self.prefix + key)

    def stats(self) -> dict[str, int]:
        return {"store_errors": self.errors}

    def close(self) -> Deferred[None]:
        return self._redis.disconnect()

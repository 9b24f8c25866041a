"""Sessions in Redis through txredisapi: shared by processes and hosts, never waited on.

Requests are pipelined on the pool's connections; each one's deadline counts
from the moment it is written, so a burst is not timed out by its own queue;
deletes made in one reactor turn (an OpenSSL flush removes thousands) go as
one ``DEL``. Failures are counted as what they are and never raised into a
handshake; the connection keeps itself alive (``redis_connection``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_sesscache.clock import LateClock, global_reactor
from twisted_sesscache.exceptions import StoreUnavailable
from twisted_sesscache.interfaces import ISessionStore
from twisted_sesscache.stores.redis_connection import RedisLink
from twisted_sesscache.stores.redis_deadlines import BUSY_CAP, Deadlines
from twisted_sesscache.stores.redis_target import RedisTarget, parse_redis_url
from twisted_sesscache.stores.redis_wire import encode_command

DEFAULT_TIMEOUT = 1.0
# Keys per DEL command: one command, but not one that stalls Redis.
DELETE_BATCH = 1000
# At most one line per this many seconds about calls refused at the cap.
REFUSAL_LOG_INTERVAL = 5.0
COUNTERS = ("store_errors", "store_request_timeouts", "store_refused")


@implementer(ISessionStore)
class RedisStore:
    """Bounded, time-limited Redis calls; failures counted (``stats()``), never raised into a handshake.

    No more than ``max_pending`` calls wait at once (a batch of deletes is
    one), so a dead Redis costs counters, not memory; while the store is known
    to be down, calls fail at once instead of waiting.
    """

    log = Logger()
    shared = True
    keeps_deadlines = True  # each request's budget runs from when it is written
    answers_at_once = False  # replies come later: offered sessions are prefetched from the hello

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        db: int = 0,
        password: str | None = None,
        *,
        username: str | None = None,
        tls: bool = False,
        ca: str | None = None,
        sni: str | None = None,
        target: RedisTarget | None = None,
        prefix: bytes = b"sesscache:",
        timeout: float = DEFAULT_TIMEOUT,
        max_pending: int = 1024,
        poolsize: int = 2,
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            reactor = LateClock(global_reactor)  # the global reactor, imported only when first used
        if not timeout > 0:
            raise ValueError(f"Redis store timeout must be a positive number of seconds, not {timeout}")
        if target is None:
            target = RedisTarget(host, port, db, username, password, tls, ca, sni)
        self._reactor = reactor
        self.address = target.address
        self.prefix = prefix
        self.timeout = timeout
        self.max_pending = max_pending
        self.counts = dict.fromkeys(COUNTERS, 0)
        self._pending = 0
        self._refused_logged_at: float | None = None
        self._refused_since_log = 0
        self._deletes: list[bytes] = []
        self._delete_waiters: list[Deferred[None]] = []
        self._delete_flush: Any = None
        self._link = RedisLink(target, timeout=timeout, poolsize=poolsize, reactor=reactor)
        self._deadlines = Deadlines(reactor, self._link)

    @classmethod
    def from_url(cls, url: str, reactor: Any = None, **kwargs: Any) -> RedisStore:
        """``redis://``, ``rediss://``, ``redis+sentinel://`` (see ``redis_target``); keywords override the URL."""
        target = parse_redis_url(url)
        overrides = {name: kwargs.pop(name) for name in ("ca", "sni") if kwargs.get(name) is not None}
        target = dataclasses.replace(target, **overrides)
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = target.timeout or DEFAULT_TIMEOUT
        return cls(target=target, reactor=reactor, **kwargs)

    @property
    def errors(self) -> int:
        return self.counts["store_errors"]

    def get(self, key: bytes, timeout: float | None = None) -> Deferred[bytes | None]:
        """``timeout``: the caller's budget, counted from when the request is sent (default: the store's)."""
        return self._call(("GET", self.prefix + key), timeout)

    def set(self, key: bytes, value: bytes, ttl: int) -> Deferred[None]:
        if ttl <= 0:
            return self.delete(key)
        return self._call(("SET", self.prefix + key, value, "EX", int(ttl))).addCallback(lambda _: None)

    def add(self, key: bytes, value: bytes, ttl: int) -> Deferred[bool]:
        added = self._call(("SET", self.prefix + key, value, "EX", max(1, int(ttl)), "NX"))
        return added.addCallback(lambda reply: reply is not None)

    def take(self, key: bytes, timeout: float | None = None) -> Deferred[bytes | None]:
        return self._call(("GETDEL", self.prefix + key), timeout)

    def delete(self, key: bytes) -> Deferred[None]:
        """Coalesced with every other delete of this reactor turn into one ``DEL``."""
        return self.delete_many((key,))

    def delete_many(self, keys: Iterable[bytes]) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self._deletes.extend(self.prefix + key for key in keys)
        self._delete_waiters.append(waiter)
        if self._delete_flush is None:
            self._delete_flush = self._reactor.callLater(0, self._flush_deletes)
        return waiter

    def stats(self) -> dict[str, int]:
        return {
            **self.counts,
            "store_reconnects": self._link.reconnects,
            "store_connected": int(self._link.connected),
            "store_pending": self._pending,
        }

    def close(self) -> Deferred[None]:
        self._deadlines.stop()
        if self._delete_flush is not None:
            self._delete_flush.cancel()
            self._flush_deletes()
        return self._link.close().addCallback(lambda _: None)

    def _flush_deletes(self) -> None:
        self._delete_flush = None
        keys, waiters = list(dict.fromkeys(self._deletes)), self._delete_waiters
        self._deletes, self._delete_waiters = [], []
        batches = [self._call(("DEL", *keys[i : i + DELETE_BATCH])) for i in range(0, len(keys), DELETE_BATCH)]
        if len(batches) == 1 and len(waiters) == 1:  # the usual turn: one delete, its own reply
            batches[0].addCallback(lambda _: None).chainDeferred(waiters[0])
            return

        def done(_: Any) -> None:
            for waiter in waiters:
                waiter.callback(None)

        def failed(failure: Any) -> None:
            error = failure.value.subFailure.value if hasattr(failure.value, "subFailure") else failure.value
            for waiter in waiters:
                waiter.errback(Failure(error))

        gatherResults(batches, consumeErrors=True).addCallbacks(done, failed)

    def _call(self, command: tuple[Any, ...], timeout: float | None = None) -> Deferred[Any]:
        if self._link.down:
            self.counts["store_errors"] += 1
            return fail(StoreUnavailable(f"Redis session store at {self.address} is unavailable"))
        if self._pending >= self.max_pending:
            return self._refuse()
        budget = self.timeout if timeout is None else timeout
        if budget > self._link.longest_budget:
            self._link.longest_budget = budget
        self._pending += 1
        request = encode_command(*command)
        connection = self._link.ready()
        if connection is not None:  # the usual case: sent now, one deadline among all in flight
            result = connection.send(request)
            self._deadlines.watch(result, budget)
        else:  # starting, or reconnecting: wait for a connection, within the budget too

            def send(connection: Any) -> Deferred[Any]:
                sent = connection.send(request)
                self._deadlines.watch(sent, budget)
                return sent

            result = _deadline(self._link.connection(), budget, self._reactor, self._link).addCallback(send)
        return result.addBoth(self._finished)

    def _finished(self, result: Any) -> Any:
        self._pending -= 1
        if not isinstance(result, Failure):
            return result
        if result.check(CancelledError):
            return result  # the caller gave up: not the store's failure
        if result.check(TimeoutError):
            self.counts["store_request_timeouts"] += 1
            return result
        self.counts["store_errors"] += 1
        return Failure(StoreUnavailable(str(result.value) or type(result.value).__name__))

    def _refuse(self) -> Deferred[Any]:
        self.counts["store_refused"] += 1
        self._refused_since_log += 1
        now = self._reactor.seconds()
        if self._refused_logged_at is None or now - self._refused_logged_at >= REFUSAL_LOG_INTERVAL:
            self.log.warn(
                "Redis session store at {address} refused {count} call(s): {cap} already waiting "
                "(counted in store_refused; at most one such line per {interval:g} s)",
                address=self.address,
                count=self._refused_since_log,
                cap=self.max_pending,
                interval=REFUSAL_LOG_INTERVAL,
            )
            self._refused_logged_at = now
            self._refused_since_log = 0
        return fail(StoreUnavailable(f"{self._pending} Redis calls already waiting"))


def _deadline(deferred: Deferred[Any], seconds: float, clock: Any, link: RedisLink) -> Deferred[Any]:
    """The wait for a connection, failed with TimeoutError by the rules of ``Deadlines``.

    Rare (while the pool starts or reconnects), so it keeps a timer of its own.
    """
    issued = clock.seconds()
    state: dict[str, Any] = {"expired": False, "timer": None}

    def arm() -> None:
        due = clock.seconds() + seconds
        # One more reactor turn after the budget: a reply already in the socket is read first.
        state["timer"] = clock.callLater(seconds, lambda: clock.callLater(0, judge, due))

    def judge(due: float) -> None:
        if deferred.called:
            return
        now = clock.seconds()
        busy = now - due > seconds / 2 or link.answering(issued)
        if busy and now - issued < BUSY_CAP:
            arm()
            return
        state["expired"] = True
        deferred.cancel()

    def settle(result: Any) -> Any:
        timer = state["timer"]
        if timer is not None and timer.active():
            timer.cancel()
        if state["expired"] and isinstance(result, Failure) and result.check(CancelledError):
            return Failure(TimeoutError(f"no answer from Redis within {seconds:g} s"))
        return result

    arm()
    return deferred.addBoth(settle)


__all__ = ["RedisStore"]

"""Flushing expired sessions from the reactor, in slices, instead of OpenSSL's stall every 255 sessions.

OpenSSL keeps its cache ordered by expiry, so a flush costs in proportion to
what it removes. A scheduled tick removes what expired since the last tick one
second of expiry at a time, one second per reactor turn: a burst of expiries
never holds the reactor for longer than one second's worth (measured in
docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from twisted_sesscache._openssl import OpenSSLAccess
from twisted_sesscache.server.contexts import ServerContexts

# A scheduled flush catches up on at most this many seconds (a slice each):
# after a long pause or a clock jump, the first slice takes the rest at once.
MAX_FLUSH_SLICES = 3600


class FlushSchedule:
    """SSL_CTX_flush_sessions(3) over a cache's contexts, on demand or every ``interval`` seconds.

    ``also`` runs at each tick before the sessions are flushed: the client
    side's and an in-process store's expiry ride on the same loop.
    """

    log = Logger()

    def __init__(
        self,
        contexts: ServerContexts,
        runtime: OpenSSLAccess,
        clock: IReactorTime,
        interval: float,
        also: Callable[[int], None] = lambda now: None,
    ) -> None:
        self.contexts = contexts
        self.runtime = runtime
        self.clock = clock
        self.interval = interval
        self.also = also
        self.flushes = 0
        self.flushed = 0
        self._loop: LoopingCall | None = None
        self._flushed_until: int | None = None

    def flush(self, now: float) -> int:
        """Every session expired at ``now`` goes; returns how many went."""
        self.flushes += 1
        removed = self.flush_until(int(now))
        if removed:
            self.log.info("Flushed {removed} expired TLS sessions", removed=removed)
        return removed

    def flush_until(self, moment: int) -> int:
        """One slice: the sessions expired at ``moment``."""
        removed = 0
        for context in self.contexts.contexts:
            before = self.runtime.counters(context)["number"]
            self.runtime.flush(context, moment)
            removed += before - self.runtime.counters(context)["number"]
        self.flushed += removed
        return removed

    @property
    def running(self) -> bool:
        return self._loop is not None and self._loop.running

    def start(self) -> None:
        if self._flushed_until is None:
            # OpenSSL's flush of a moment takes everything expired by then: the first slice
            # takes what expired before the start, and the first tick need not walk back.
            self._flushed_until = int(self.clock.seconds())
        if self.interval and not self.running:
            self._loop = LoopingCall(self._tick)
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _tick(self) -> None:
        """One tick: a failure is logged, and the loop goes on."""
        now = int(self.clock.seconds())
        try:
            self.also(now)
        except Exception:
            self.log.failure("Scheduled flush of client sessions or store records failed")
        if not (self.contexts.contexts and self.runtime.shared):
            return
        # From where the last tick ended (or the start), as far back as slices go.
        start = max(self._flushed_until or 0, now - MAX_FLUSH_SLICES)
        self._flushed_until = now
        self.flushes += 1
        self._slices(iter(range(start + 1, now + 1)), 0)

    def _slices(self, moments: Iterator[int], removed: int) -> None:
        try:
            moment = next(moments, None)
            if moment is not None:
                removed += self.flush_until(moment)
        except Exception:
            self.log.failure("Scheduled session flush failed")
            return
        if moment is not None:
            self.clock.callLater(0, self._slices, moments, removed)
        elif removed:
            self.log.info("Flushed {removed} expired TLS sessions", removed=removed)


__all__ = ["MAX_FLUSH_SLICES", "FlushSchedule"]

"""Graceful shutdown: wait for the connections already open, up to a deadline, then close them.

SIGTERM should not cut a response in half: the listener stops accepting, and
the connections it accepted get ``timeout`` seconds to finish on their own.
Those still open then are closed the orderly way; whatever has not gone
``GRACE`` seconds later (a peer that does not read) is aborted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

T = TypeVar("T")
GRACE = 2.0


class Drain(Generic[T]):
    """The open connections of one listener, and the Deferreds waiting for there to be none."""

    def __init__(self, clock: IReactorTime, log: Logger, what: str) -> None:
        self.clock = clock
        self.log = log
        self.what = what
        self._members: dict[T, None] = {}  # insertion-ordered set
        self._waiting: list[Deferred[None]] = []
        self._calls: list[IDelayedCall] = []
        self._started = 0.0

    def __len__(self) -> int:
        return len(self._members)

    def add(self, member: T) -> None:
        self._members[member] = None

    def discard(self, member: T) -> None:
        self._members.pop(member, None)
        if not self._members and self._waiting:
            self.log.info("Shutdown: every one of the {what} finished after {seconds:.1f} s",
                          what=self.what, seconds=self.clock.seconds() - self._started)
            self._fire()

    def members(self) -> list[T]:
        return list(self._members)

    def wait(self, timeout: float, close: Callable[[T], Any], abort: Callable[[T], Any]) -> Deferred[None]:
        """A Deferred that fires once no member is left; at ``timeout`` the rest are closed."""
        done: Deferred[None] = Deferred()
        self._waiting.append(done)
        if not self._members:
            self._fire()
            return done
        if len(self._waiting) == 1:
            self._started = self.clock.seconds()
            self.log.info("Shutdown: waiting up to {timeout:g} s for {count} {what}",
                          timeout=timeout, count=len(self._members), what=self.what)
            self._calls.append(self.clock.callLater(timeout, self._deadline, timeout, close, abort))
        return done

    def _deadline(self, timeout: float, close: Callable[[T], Any], abort: Callable[[T], Any]) -> None:
        left = self.members()
        self.log.info("Shutdown: closing {count} {what} still open after {timeout:g} s",
                      count=len(left), what=self.what, timeout=timeout)
        for member in left:
            close(member)
        self._calls.append(self.clock.callLater(GRACE, self._abort, abort))

    def _abort(self, abort: Callable[[T], Any]) -> None:
        for member in self.members():
            abort(member)
        self._fire()

    def _fire(self) -> None:
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []
        waiting, self._waiting = self._waiting, []
        for done in waiting:
            done.callback(None)


__all__ = ["GRACE", "Drain"]

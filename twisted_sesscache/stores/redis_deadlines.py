"""The deadlines of every Redis request in flight, on one timer.

A timer per request (``callLater`` to arm, ``cancel`` when the reply comes,
twice per request when the wait for a connection had its own) costs more
than the request itself on a busy server. Requests of one budget expire in
the order they were sent, so each budget keeps a FIFO of (Deferred, sent,
due); answered requests are dropped lazily when they reach its head, and one
timer waits for the earliest head.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError

from twisted_sesscache.stores.redis_connection import RedisLink

# The longest a request waits, in all, while Redis answers but this process is too busy to read it.
BUSY_CAP = 1.0


class Deadlines:
    """Fails a request with TimeoutError once Redis, not this process, has taken its budget.

    When a budget runs out, the request is failed only if Redis has been
    silent: if it answered anything since the request was sent, has bytes
    waiting in a socket, or the reactor itself ran late (busy with a burst of
    handshakes), the budget is given again, up to ``BUSY_CAP`` in all. A
    stalled Redis costs the budget (and one reactor turn); a burst on a busy
    reactor is not cut short.
    """

    def __init__(self, clock: Any, link: RedisLink) -> None:
        self._clock = clock
        self._link = link
        self._queues: dict[float, deque[tuple[Deferred[Any], float, float]]] = {}
        self._timer: Any = None
        self._timer_due = math.inf
        self._judging = False

    def watch(self, request: Deferred[Any], budget: float) -> None:
        """Give ``request``, just sent, ``budget`` seconds from now."""
        now = self._clock.seconds()
        due = now + budget
        queue = self._queues.get(budget)
        if queue is None:
            queue = self._queues[budget] = deque()
        queue.append((request, now, due))
        if due < self._timer_due and not self._judging:
            self._arm(due)

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer, self._timer_due = None, math.inf

    def _arm(self, due: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer_due = due
        delay = max(0.0, due - self._clock.seconds())
        # One more reactor turn after the budget: a reply already in the socket is read first.
        self._timer = self._clock.callLater(delay, lambda: self._clock.callLater(0, self._judge))

    def _judge(self) -> None:
        self._timer, self._timer_due = None, math.inf
        self._judging = True
        try:
            now = self._clock.seconds()
            waiting: list[bool] = []  # whether Redis's bytes wait unread: asked once per pass
            for budget, queue in list(self._queues.items()):
                self._judge_queue(queue, budget, now, waiting)
        finally:
            self._judging = False
        heads = [queue[0][2] for queue in self._queues.values() if queue]
        if heads:
            self._arm(min(heads))

    def _judge_queue(
        self, queue: deque[tuple[Deferred[Any], float, float]], budget: float, now: float, waiting: list[bool]
    ) -> None:
        while queue:
            request, sent, due = queue[0]
            if request.called:
                queue.popleft()
                continue
            if due > now:
                return
            queue.popleft()
            if now - sent < BUSY_CAP and (now - due > budget / 2 or self._answering(sent, waiting)):
                queue.append((request, sent, now + budget))  # later than every other entry: still in order
                continue
            request.errback(TimeoutError(f"no answer from Redis within {budget:g} s"))

    def _answering(self, sent: float, waiting: list[bool]) -> bool:
        if self._link.last_reply >= sent:
            return True
        if not waiting:
            waiting.append(self._link.answering(math.inf))
        return waiting[0]


__all__ = ["BUSY_CAP", "Deadlines"]

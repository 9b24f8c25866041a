"""The one clock of a session cache, chosen late.

A cache's flush loop, store lookups, ticket keys and client sessions all read
time from the same ``IReactorTime``. Components hold this stand-in, which asks
the cache for its clock at each call, so that a clock handed over after
construction (``SessionCache.start(clock)``, or a test's ``task.Clock``)
reaches every one of them, and the global reactor is imported only if no
clock was ever given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer


def global_reactor() -> IReactorTime:
    from twisted.internet import reactor

    return reactor


@implementer(IReactorTime)
class LateClock:
    """An ``IReactorTime`` that delegates to whatever ``resolve()`` returns at call time."""

    def __init__(self, resolve: Callable[[], IReactorTime]) -> None:
        self._resolve = resolve

    def seconds(self) -> float:
        return self._resolve().seconds()

    def callLater(self, delay: float, callable: Callable[..., Any], *args: object, **kw: object) -> IDelayedCall:
        return self._resolve().callLater(delay, callable, *args, **kw)

    def getDelayedCalls(self) -> list[IDelayedCall]:
        return list(self._resolve().getDelayedCalls())


__all__ = ["LateClock", "global_reactor"]

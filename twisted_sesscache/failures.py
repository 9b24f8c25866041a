"""Failures counted and logged without letting a flood of them flood the log.

A port scan or a misconfigured client makes hundreds of failed connections a
second; each one deserves a count, but only the first few a log line. The
rest are summed up in one "N more ... in the last M s" line, so the log
still says how many there were.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

LINES_PER_SECOND = 3
SUMMARY_INTERVAL = 10.0


class RateLimitedLog:
    """At most ``lines_per_second`` lines in each second; the others summed up every ``summary_interval`` s."""

    def __init__(
        self,
        log: Logger,
        clock: IReactorTime,
        what: str,
        *,
        level: LogLevel = LogLevel.info,
        lines_per_second: int = LINES_PER_SECOND,
        summary_interval: float = SUMMARY_INTERVAL,
    ) -> None:
        self.log = log
        self.clock = clock
        self.what = what
        self.level = level
        self.lines_per_second = lines_per_second
        self.summary_interval = summary_interval
        self.suppressed = 0
        self._window_start = float("-inf")
        self._in_window = 0
        self._suppressed_since = 0.0
        self._summary: IDelayedCall | None = None

    def emit(self, format: str, **kwargs: Any) -> bool:
        """Log one line unless this second's allowance is spent; True when it was logged."""
        now = self.clock.seconds()
        if now - self._window_start >= 1.0:
            self._window_start, self._in_window = now, 0
        if self._in_window < self.lines_per_second:
            self._in_window += 1
            self.log.emit(self.level, format, **kwargs)
            return True
        if self.suppressed == 0:
            self._suppressed_since = now
            self._summary = self.clock.callLater(self.summary_interval, self.flush)
        self.suppressed += 1
        return False

    def flush(self) -> None:
        """Log the summary of the suppressed lines now (if any) and cancel the pending one."""
        if self._summary is not None and self._summary.active():
            self._summary.cancel()
        self._summary = None
        if self.suppressed:
            count, self.suppressed = self.suppressed, 0
            seconds = max(self.clock.seconds() - self._suppressed_since, 1.0)
            self.log.emit(self.level, "{count} more {what} in the last {seconds:.0f} s",
                          count=count, what=self.what, seconds=seconds)


def failure_reason(reason: Failure) -> str:
    """OpenSSL's reason strings when the failure is an ``SSL.Error``, else the exception in a few words."""
    value = reason.value
    if isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list):
        reasons = [str(entry[-1]) for entry in value.args[0] if isinstance(entry, tuple) and entry]
        if reasons:
            return ", ".join(reasons)
    text = str(value).strip().rstrip(".")
    return f"{type(value).__name__}: {text}" if text else type(value).__name__


def peer_text(address: IAddress | None) -> str:
    """``host:port`` (``[v6]:port``) of an address, or its repr for other kinds."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None or port is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


__all__ = ["LINES_PER_SECOND", "SUMMARY_INTERVAL", "RateLimitedLog", "failure_reason", "peer_text"]

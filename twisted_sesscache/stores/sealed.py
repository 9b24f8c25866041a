"""A store seen through a Sealer: sealed on the way in, opened and checked on the way out, counted.

Both the server's external cache and the client cache read records with a
deadline on the reactor thread and must drop, count and log (once) whatever
does not open; this is that one piece.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.logger import Logger

from twisted_sesscache.sealing import SealError, Sealer
from twisted_sesscache.interfaces import ISessionStore

COUNTERS = ("store_hits", "store_misses", "store_timeouts", "store_rejected", "store_writes")


class SealedRecords:
    """Records of one kind in a store; ``counts`` says how reads and writes went."""

    log = Logger()

    def __init__(
        self, store: ISessionStore, sealer: Sealer, kind: bytes, *, timeout: float, reactor: Any = None
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.store = store
        self.sealer = sealer
        self.kind = kind
        self.timeout = timeout
        self._reactor = reactor
        self.counts = dict.fromkeys(COUNTERS, 0)
        self._logged: set[str] = set()

    def put(self, name: bytes, plaintext: bytes, context: bytes, ttl: int) -> None:
        """Write, never waited on; a failure is counted by the store."""
        if ttl <= 0:
            return
        self.counts["store_writes"] += 1
        record = self.sealer.seal(plaintext, kind=self.kind, context=context)
        self.store.set(name, record, ttl).addErrback(_ignored)

    def delete(self, name: bytes) -> None:
        self.store.delete(name).addErrback(_ignored)

    def fetch(
        self, name: bytes, context: bytes, check: Callable[[bytes], object] | None = None
    ) -> Deferred[bytes | None]:
        """The opened record, or None: absent, late, failed, or rejected (by the seal or by ``check``).

        Never fails, and never takes longer than the timeout.
        """

        def found(record: bytes | None) -> bytes | None:
            if record is None:
                self.counts["store_misses"] += 1
                return None
            try:
                plaintext = self.sealer.open(record, kind=self.kind, context=context)
                if check is not None:
                    check(plaintext)
            except (SealError, ValueError) as error:
                self._reject(error)
                return None
            self.counts["store_hits"] += 1
            return plaintext

        def failed(failure: Any) -> None:
            self.counts["store_timeouts" if failure.check(TimeoutError) else "store_misses"] += 1
            return None

        lookup = self.store.get(name)
        lookup.addTimeout(self.timeout, self._reactor)
        return lookup.addCallbacks(found, failed)

    def _reject(self, error: Exception) -> None:
        self.counts["store_rejected"] += 1
        reason = type(error).__name__
        if reason not in self._logged:
            self._logged.add(reason)
            self.log.warn(
                "Dropped a stored {kind} record that does not open ({reason}: {error}); "
                "the handshake goes on as a full one. Further ones are only counted.",
                kind=self.kind.decode("ascii", "replace"),
                reason=reason,
                error=error,
            )


def _ignored(failure: Any) -> None:
    """Store failures are counted (and logged) by the store itself."""

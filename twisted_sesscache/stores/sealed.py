"""A store seen through a sealer: sealed on the way in, opened and decoded on the way out, counted.

Both the server's external cache and the client cache read records with a
deadline on the reactor thread and must drop, count and log (once) whatever
does not open; this is that one piece.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.python.failure import Failure
from twisted.logger import Logger

from twisted_sesscache.exceptions import UnknownKeyError
from twisted_sesscache.sealing import RecordSealer, SealError
from twisted_sesscache.interfaces import ISessionStore

_T = TypeVar("_T")
COUNTERS = ("store_hits", "store_misses", "store_timeouts", "store_lookup_errors", "store_rejected",
            "store_foreign_key", "store_writes")


class SealedRecords:
    """Records of one kind in a store; ``counts`` says how reads and writes went."""

    log = Logger()

    def __init__(
        self, store: ISessionStore, sealer: RecordSealer, kind: bytes, *, timeout: float, reactor: Any = None
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
        record = self.sealer.seal(plaintext, kind=self.kind, context=record_context(name, context))
        self.store.set(name, record, ttl).addErrback(_ignored)

    def delete(self, name: bytes) -> None:
        self.store.delete(name).addErrback(_ignored)

    def fetch(self, name: bytes, context: bytes, decode: Callable[[bytes], _T]) -> Deferred[_T | None]:
        """The opened record as ``decode`` makes it, or None: absent, late, failed, or rejected.

        Rejected: by the seal, or by ``decode`` raising ValueError. Never
        fails, and never takes longer than the timeout.
        """
        return self.fetch_first([(name, False)], context, decode)

    def fetch_first(
        self, names: Sequence[tuple[bytes, bool]], context: bytes, decode: Callable[[bytes], _T]
    ) -> Deferred[_T | None]:
        """The first of ``names`` the store holds, opened; ``(name, True)`` is taken (read and deleted).

        One lookup as the counters see it, under one deadline, however many
        names it tries. A record opens only under the name it was written
        under: one copied or moved to another key is rejected.
        """
        state: dict[str, object] = {}

        def read(index: int) -> Deferred[bytes | None]:
            name, take = names[index]
            state["name"] = name
            read_one = self.store.take if take else self.store.get
            call = read_one(name, timeout=self.timeout) if self.store.keeps_deadlines else read_one(name)
            if index + 1 == len(names):
                return call
            return call.addCallback(lambda record: record if record is not None else read(index + 1))

        def found(record: bytes | None) -> _T | None:
            if record is None:
                self.counts["store_misses"] += 1
                return None
            try:
                plaintext = self.sealer.open(record, kind=self.kind, context=record_context(state["name"], context))  # type: ignore[arg-type]
                value = decode(plaintext)
            except (SealError, ValueError) as error:
                self._reject(error)
                return None
            self.counts["store_hits"] += 1
            return value

        def failed(failure: Failure) -> None:
            # Our own deadline is a timeout; a caller's cancel is nothing; anything else is an error, not a miss.
            if failure.check(TimeoutError):
                self.counts["store_timeouts"] += 1
            elif not failure.check(CancelledError):
                self.counts["store_lookup_errors"] += 1
            return None

        lookup = read(0)
        # A store that keeps deadlines counts the budget from the moment it sends each
        # request, so a burst queued behind others is not cut short, and always answers
        # (a timeout at the latest): no second timer per lookup. An embedded store (memory,
        # LMDB) has answered already: no timer (~20 µs) to arm either.
        if not lookup.called and not self.store.keeps_deadlines:
            lookup.addTimeout(self.timeout, self._reactor)
        return lookup.addCallbacks(found, failed)

    def _reject(self, error: Exception) -> None:
        self.counts["store_rejected"] += 1
        if isinstance(error, UnknownKeyError):  # another fleet's record, or a member with another key file
            self.counts["store_foreign_key"] += 1
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


def record_context(name: bytes, context: bytes) -> bytes:
    """The sealing context of a record: the caller's, and the store name it lives under.

    Binding the name is what makes a record copied or moved to another key
    (another session ID, another client key, the other TLS version's slot)
    fail to open, instead of resuming the wrong session.
    """
    return struct.pack(">I", len(name)) + name + context


def _ignored(failure: Any) -> None:
    """Store failures are counted (and logged) by the store itself."""

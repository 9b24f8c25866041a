"""The seams: what a session store, and a source of shared ticket keys, must provide."""

from __future__ import annotations

from typing import NamedTuple

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


class ISessionStore(Interface):
    """Where sealed session records live outside OpenSSL (as rustls' ``StoresServerSessions``).

    Every call returns a Deferred and never blocks the reactor; values are
    opaque (already sealed) bytes; a TTL in whole seconds bounds every record.
    A store that fails does so through its Deferreds, never by raising.
    """

    shared = Attribute(
        "True when other processes read the records (Redis, a file): every process then "
        "needs the same sealing key; False for a store that never leaves this process."
    )

    keeps_deadlines = Attribute(
        "True when get and take honour their timeout argument, counted from the moment the request "
        "is sent (a burst queued behind others is not cut short); otherwise callers keep the deadline."
    )

    answers_at_once = Attribute(
        "True when every Deferred get and take return has already fired (memory, LMDB): OpenSSL's "
        "get-session callback then asks the store directly, with no ClientHello read or prefetch. "
        "False for a store that answers later (Redis)."
    )

    def get(key: bytes, timeout: float | None = None) -> Deferred[bytes | None]:
        """The value under ``key``, or None; ``timeout`` as ``keeps_deadlines`` says."""

    def take(key: bytes, timeout: float | None = None) -> Deferred[bytes | None]:
        """The value under ``key``, removed in the same step (Redis GETDEL): single-use records."""

    def set(key: bytes, value: bytes, ttl: int) -> Deferred[None]:
        """Store ``value`` for ``ttl`` seconds (0 or less: remove it)."""

    def add(key: bytes, value: bytes, ttl: int) -> Deferred[bool]:
        """Set only if absent; true when this call set it (shared ticket keys: first one wins)."""

    def delete(key: bytes) -> Deferred[None]:
        """Remove ``key`` if present."""

    def stats() -> dict[str, int]:
        """The store's own counters (``store_errors``, ...), for ``SessionCache.stats()``."""

    def close() -> Deferred[None]:
        """Release connections and files."""


class IExpiringStore(ISessionStore):
    """A store whose records nothing else expires: the cache's flush loop calls ``expire``."""

    def expire(budget: int | None = None) -> int:
        """Drop at most ``budget`` expired records, oldest first; return how many went."""


class TicketKey(NamedTuple):
    """One TLS session-ticket key, as OpenSSL's ticket-key callback uses it."""

    name: bytes  # 16 bytes, sent in every ticket
    aes: bytes  # 32 bytes, AES-256-CBC
    hmac: bytes  # 32 bytes, HMAC-SHA256


class ITicketKeySource(Interface):
    """Ticket keys OpenSSL's callback asks for synchronously, inside a handshake."""

    def current() -> TicketKey | None:
        """The key new tickets are sealed with; None: issue no ticket yet."""

    def find(name: bytes) -> tuple[TicketKey, bool] | None:
        """The key a ticket names and whether it is the current one; None when unknown."""


__all__ = ["IExpiringStore", "ISessionStore", "ITicketKeySource", "TicketKey"]

"""What a cache shares through its store: the sealing key, server sessions, ticket keys, client sessions.

Built once from a :class:`~twisted_sesscache.config.CacheConfig` that names a
store; everything that reaches the store goes through the one sealer: AES-GCM
for a store other processes read (or when given a key), none for an
in-process store that only this process can read or write.
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twisted_sesscache._openssl import OpenSSLAccess
from twisted_sesscache.client.shared import SharedClientSessions
from twisted_sesscache.config import CacheConfig, Tickets
from twisted_sesscache.exceptions import ConfigurationError, KeyFileError
from twisted_sesscache.interfaces import IExpiringStore, ISessionStore
from twisted_sesscache.sealing import UNSEALED, RecordSealer, Sealer, key_fingerprint, load_or_create_key_file
from twisted_sesscache.server.external import ExternalSessions
from twisted_sesscache.server.tickets import SharedTicketKeys
from twisted_sesscache.stores import store_from_url
from twisted_sesscache.stores.sealed import COUNTERS as RECORD_COUNTERS

# Records an in-process store drops per flush tick at most (a few milliseconds' work).
STORE_EXPIRY_BUDGET = 1000
_log = Logger(namespace="twisted_sesscache.sharing")


class Sharing:
    """The store and the pieces that use it, for one cache."""

    def __init__(self, config: CacheConfig, runtime: OpenSSLAccess, clock: IReactorTime) -> None:
        self.config = config
        self.clock = clock
        self.store = _store(config, clock)
        keys = _keys(config, self.store)
        self.sealer: RecordSealer = Sealer(keys) if keys else UNSEALED
        self.key_fingerprint = key_fingerprint(keys[0]) if keys else None
        self.external: ExternalSessions | None = None
        # The bundled runtime cannot reach OpenSSL's session callbacks.
        if runtime.shared and _asks_store_for_sessions(config, self.store):
            self.external = ExternalSessions(
                self.store, self.sealer, runtime, lookup_timeout=config.store_timeout, reactor=clock,
                tickets=bool(config.tickets),
            )
        self.ticket_keys: SharedTicketKeys | None = None
        if config.tickets is Tickets.SHARED:
            self.ticket_keys = SharedTicketKeys(
                self.store, self.sealer, rotation=config.ticket_key_rotation, lifetime=config.timeout, reactor=clock
            )
        self._client: SharedClientSessions | None = None

    def client_sessions(self) -> SharedClientSessions:
        """The client side's view of the store (made on first use)."""
        if self._client is None:
            self._client = SharedClientSessions(
                self.store, self.sealer, timeout=self.config.store_timeout, clock=self.clock
            )
        return self._client

    def start(self) -> Deferred[None] | None:
        """Fetch shared ticket keys; a Deferred that fires once they are in hand, if any."""
        return self.ticket_keys.start() if self.ticket_keys is not None else None

    def stop(self) -> None:
        if self.ticket_keys is not None:
            self.ticket_keys.stop()

    def expire(self) -> None:
        """One flush tick's worth of expiry, for a store whose records nothing else expires."""
        if IExpiringStore.providedBy(self.store):
            self.store.expire(budget=STORE_EXPIRY_BUDGET)

    def stats(self) -> dict[str, object]:
        summary: dict[str, object] = {"store": type(self.store).__name__, "store_key_fingerprint": self.key_fingerprint}
        summary.update(self.store.stats())
        # No external sessions (tickets, or the bundled runtime): no server lookup was made.
        summary.update(self.external.counts if self.external is not None else dict.fromkeys(RECORD_COUNTERS, 0))
        return summary


def _asks_store_for_sessions(config: CacheConfig, store: ISessionStore) -> bool:
    """Whether server sessions go through the store, besides OpenSSL's own cache.

    Not with tickets on and a store that answers later (Redis): sessions
    travel in their tickets, and only a TLS 1.2 client that takes no ticket
    would resume from the store, which for the store to be asked in time
    means reading every hello before OpenSSL does, for every client. Such a
    client resumes on the process it first met. A store that answers at once
    (LMDB) is asked inside OpenSSL's callback, for those clients only.
    """
    return not config.tickets or bool(store.answers_at_once)


def _store(config: CacheConfig, clock: IReactorTime) -> ISessionStore:
    if not isinstance(config.store, str):
        if not ISessionStore.providedBy(config.store):
            raise ConfigurationError("store", f"{config.store!r} does not provide ISessionStore")
        return config.store
    try:
        return store_from_url(config.store, clock, ca=config.store_ca, size=config.size_limit)
    except ValueError as error:
        raise ConfigurationError("store", str(error)) from None


def _keys(config: CacheConfig, store: ISessionStore) -> list[bytes]:
    """The sealing keys; none for an in-process store given none (its records never leave)."""
    if config.store_keys:
        return list(config.store_keys)
    if config.store_key_file is not None:
        existed = os.path.lexists(config.store_key_file)
        try:
            key = load_or_create_key_file(config.store_key_file)
        except KeyFileError as error:
            raise ConfigurationError("store_key_file", str(error)) from None
        if not existed:
            _log.warn(
                "Created a new sealing key file {path} (fingerprint {fingerprint}): every process sharing the "
                "store must use this same file, or it cannot read their records nor they its",
                path=config.store_key_file, fingerprint=key_fingerprint(key),
            )
        return [key]
    if store.shared:
        raise ConfigurationError(
            "store_key_file",
            "a shared session store needs a sealing key that every process shares "
            "(store_keys=[32 bytes], --store-key-file)",
        )
    return []


__all__ = ["STORE_EXPIRY_BUDGET", "Sharing"]

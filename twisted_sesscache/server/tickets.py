"""TLS ticket keys shared through the store, rotated on a schedule every process agrees on.

Time is cut into epochs of ``rotation`` seconds. The key of an epoch is made
by whichever process asks first (set-if-absent in the store) and read by all
others, so every process seals new tickets under the same key, and keys of
the previous epochs keep opening tickets for one ticket lifetime. Keys are
fetched ahead of time (the next epoch's too), because OpenSSL's ticket
callback runs inside the handshake and must find them locally.
"""

from __future__ import annotations

import math
import os
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from twisted_sesscache.interfaces import ISessionStore, ITicketKeySource, TicketKey
from twisted_sesscache.sealing import RecordSealer, SealError

KIND = b"ticket-key"
CONTEXT = b"twisted-sesscache ticket keys"
MAX_WINDOW = 48  # previous epochs kept, whatever the lifetime/rotation ratio


@implementer(ITicketKeySource)
class SharedTicketKeys:
    """The ticket keys of the current, next and recent epochs, as OpenSSL's callback needs them."""

    log = Logger()

    def __init__(
        self,
        store: ISessionStore,
        sealer: RecordSealer,
        *,
        rotation: float = 3600,
        lifetime: float = 300,
        reactor: Any = None,
    ) -> None:
        if rotation <= 0:
            raise ValueError(f"ticket key rotation must be a positive number of seconds, not {rotation}")
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.store = store
        self.sealer = sealer
        self.rotation = rotation
        self.window = min(MAX_WINDOW, max(1, math.ceil(lifetime / rotation)))
        self._reactor = reactor
        self._keys: dict[int, TicketKey] = {}
        self._epoch_of: dict[bytes, int] = {}
        self._loop: LoopingCall | None = None
        self.created = 0
        self.rejected = 0

    def epoch(self) -> int:
        return int(self._reactor.seconds() // self.rotation)

    # -- what OpenSSL's callback asks, synchronously ---------------------------

    def current(self) -> TicketKey | None:
        now = self.epoch()
        for epoch in range(now, now - self.window - 1, -1):
            if epoch in self._keys:
                return self._keys[epoch]
        return None

    def find(self, name: bytes) -> tuple[TicketKey, bool] | None:
        epoch = self._epoch_of.get(name)
        if epoch is None or epoch < self.epoch() - self.window:
            return None
        key = self._keys[epoch]
        return key, key is self.current()

    # -- keeping the keys ------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Fetch (or make) the keys now, then again well before each rotation."""
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = self._reactor
        self._loop.start(min(self.rotation / 4, 60), now=False)
        return self.refresh()

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    @inlineCallbacks
    def refresh(self) -> Any:
        """One pass: read missing keys, make the current and next epoch's if nobody has."""
        now = self.epoch()
        try:
            for epoch in range(now - self.window, now + 2):
                if epoch in self._keys:
                    continue
                record = yield self.store.get(self._store_key(epoch))
                if record is None and epoch >= now:
                    made = self._seal(epoch, TicketKey(os.urandom(16), os.urandom(32), os.urandom(32)))
                    ttl = int((epoch + 2 + self.window) * self.rotation - self._reactor.seconds()) + 1
                    if (yield self.store.add(self._store_key(epoch), made, ttl)):
                        self.created += 1
                    record = yield self.store.get(self._store_key(epoch))
                if record is not None:
                    self._remember(epoch, record)
        except Exception as error:
            self.log.warn("Could not refresh shared ticket keys ({error}); will retry", error=error)
        for epoch in [e for e in self._keys if e < now - self.window]:
            self._epoch_of.pop(self._keys.pop(epoch).name, None)

    def _store_key(self, epoch: int) -> bytes:
        return b"ticket-key:" + str(epoch).encode()

    def _seal(self, epoch: int, key: TicketKey) -> bytes:
        return self.sealer.seal(key.name + key.aes + key.hmac, kind=KIND, context=CONTEXT + str(epoch).encode())

    def _remember(self, epoch: int, record: bytes) -> None:
        try:
            raw = self.sealer.open(record, kind=KIND, context=CONTEXT + str(epoch).encode())
        except SealError:
            self.rejected += 1
            self.log.warn("A stored ticket key for epoch {epoch} does not open; ignored", epoch=epoch)
            return
        if len(raw) != 80:
            self.rejected += 1
            return
        key = TicketKey(raw[:16], raw[16:48], raw[48:])
        self._keys[epoch] = key
        self._epoch_of[key.name] = epoch

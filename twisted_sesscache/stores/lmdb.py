"""A store shared by the processes of one host: an LMDB memory-mapped file, no server to run.

Every worker of ``twistd sesscache --workers N`` (and any other process given
the same directory and key file) opens the same environment, so a session
made by one is resumed by the others. A lookup is a read transaction on the
memory map, a few microseconds, so every call answers at once with an
already-fired Deferred (as the memory store does) and the reactor never waits.

Layout, in three named databases of one environment:

- ``meta``: ``format`` -> :data:`FORMAT`; a file without it is refused.
- ``records``: key -> 8-byte big-endian expiry (wall-clock milliseconds) + value.
- ``expiries``: 8-byte big-endian expiry + key -> empty; the index that lets
  expiry and eviction take the oldest records first, in bounded slices.

Writes are one transaction each, so a process killed in the middle leaves the
file as it was before or after; they are not synced to disk (a session cache
lost in a power cut costs full handshakes, nothing else), which keeps a write
in the tens of microseconds.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from typing import Any

import lmdb  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from twisted_sesscache.exceptions import SessionCacheError
from twisted_sesscache.interfaces import IExpiringStore

FORMAT = b"twisted-sesscache lmdb records v1"
_EXPIRY = struct.Struct(">Q")
# Expired records a write removes in passing, so the file stays clean without a flush loop.
EXPIRE_ON_WRITE = 2
# Bytes of map per allowed entry: sealed sessions are a few hundred bytes; LMDB pages are sparse.
MAP_BYTES_PER_ENTRY = 4096
MAP_FLOOR = 16 << 20
MAP_UNBOUNDED = 1 << 30
# LMDB's meta page (mdb.c): a 16-byte page header, then MDB_meta (magic, version, address,
# map size, two 48-byte MDB_db records whose first field holds the page size, last page, txnid).
LMDB_MAGIC = 0xBEEFC0DE
_MAGIC, _PSIZE, _LAST_PAGE, _META_END = 16, 40, 136, 152


class StoreFileError(SessionCacheError, ValueError):
    """The directory does not hold (or cannot hold) this project's LMDB environment."""


@implementer(IExpiringStore)
class LMDBStore:
    """Sealed records in an LMDB environment under ``path``, at most ``max_entries`` of them (0: no limit).

    When full, the records closest to expiry (the oldest) make room; a map
    that fills up before the count does is handled the same way, never by
    failing the caller.
    """

    shared = True  # other processes read the file: they need the same sealing key
    keeps_deadlines = False  # answers at once
    answers_at_once = True  # every Deferred it returns has fired: OpenSSL's callback may ask it directly
    log = Logger()

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_entries: int = 20480,
        *,
        clock: Callable[[], float] = time.time,
        map_size: int | None = None,
    ) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be 0 (no limit) or more")
        self.path = os.fspath(path)
        self.max_entries = max_entries
        self._clock = clock
        self.counts = {"store_errors": 0, "store_evicted": 0, "store_expired": 0}
        if map_size is None:
            map_size = max(MAP_FLOOR, max_entries * MAP_BYTES_PER_ENTRY) if max_entries else MAP_UNBOUNDED
        self._env = _open_environment(self.path, map_size)
        try:
            self._records, self._expiries = _check_format(self._env, self.path)
        except BaseException:
            self._env.close()
            raise
        self._env.reader_check()  # slots left by processes that died inside a read

    # -- ISessionStore ----------------------------------------------------------------

    def get(self, key: bytes, timeout: float | None = None) -> Deferred[bytes | None]:
        def read(txn: Any) -> bytes | None:
            raw: bytes | None = txn.get(key, db=self._records)
            return raw

        return self._transaction(read, write=False).addCallback(self._live)

    def take(self, key: bytes, timeout: float | None = None) -> Deferred[bytes | None]:
        """Read and remove in one write transaction: two processes never both get it."""
        return self._transaction(lambda txn: self._remove(txn, key)).addCallback(self._live)

    def set(self, key: bytes, value: bytes, ttl: int) -> Deferred[None]:
        if ttl <= 0:
            return self.delete(key)
        return self._transaction(lambda txn: self._put(txn, key, value, ttl))

    def add(self, key: bytes, value: bytes, ttl: int) -> Deferred[bool]:
        def add_if_absent(txn: Any) -> bool:
            raw = txn.get(key, db=self._records)
            if raw is not None and _EXPIRY.unpack_from(raw)[0] > self._now():
                return False
            self._put(txn, key, value, ttl)
            return True

        return self._transaction(add_if_absent)

    def delete(self, key: bytes) -> Deferred[None]:
        return self._transaction(lambda txn: self._remove(txn, key) and None)

    def stats(self) -> dict[str, int]:
        return {**self.counts, "store_entries": len(self)}

    def close(self) -> Deferred[None]:
        self._env.close()
        return succeed(None)

    def __len__(self) -> int:
        with self._env.begin() as txn:
            return int(txn.stat(self._records)["entries"])

    # -- IExpiringStore ---------------------------------------------------------------

    def expire(self, budget: int | None = None) -> int:
        """Drop at most ``budget`` expired records, oldest first, in one write transaction."""
        try:
            with self._env.begin(write=True) as txn:
                _, removed = self._drop_oldest(txn, 0, budget)
            self._env.reader_check()
        except lmdb.Error as error:
            self._failed(error)
            return 0
        self.counts["store_expired"] += removed
        return removed

    # -- inside write transactions ------------------------------------------------------

    def _live(self, raw: bytes | None) -> bytes | None:
        if raw is None or _EXPIRY.unpack_from(raw)[0] <= self._now():
            return None
        return raw[_EXPIRY.size:]

    def _now(self) -> int:
        return int(self._clock() * 1000)

    def _put(self, txn: Any, key: bytes, value: bytes, ttl: int) -> None:
        excess = 0
        if self._remove(txn, key) is None and self.max_entries:
            excess = max(0, int(txn.stat(self._records)["entries"]) - self.max_entries + 1)
        evicted, expired = self._drop_oldest(txn, excess, EXPIRE_ON_WRITE)
        self.counts["store_evicted"] += evicted
        self.counts["store_expired"] += expired
        expiry = _EXPIRY.pack(self._now() + ttl * 1000)
        txn.put(key, expiry + value, db=self._records)
        txn.put(expiry + key, b"", db=self._expiries)

    def _remove(self, txn: Any, key: bytes) -> bytes | None:
        raw: bytes | None = txn.pop(key, db=self._records)
        if raw is not None:
            txn.delete(raw[:_EXPIRY.size] + key, db=self._expiries)
        return raw

    def _drop_oldest(self, txn: Any, evict: int, expire: int | None) -> tuple[int, int]:
        """Drop the ``evict`` oldest records, then at most ``expire`` (None: all) expired ones.

        One pass of one cursor over the expiry index; returns (evicted, expired).
        """
        now, evicted, expired = self._now(), 0, 0
        cursor = txn.cursor(db=self._expiries)
        if not cursor.first():
            return 0, 0
        while True:
            index = cursor.key()
            if not index:
                break
            if evicted < evict:
                evicted += 1
            elif (expire is None or expired < expire) and _EXPIRY.unpack_from(index)[0] <= now:
                expired += 1
            else:
                break
            txn.delete(index[_EXPIRY.size:], db=self._records)
            cursor.delete()  # and on to the next entry
        return evicted, expired

    def _transaction(self, work: Callable[[Any], Any], *, write: bool = True) -> Deferred[Any]:
        """``work`` in one transaction, as a fired Deferred; a full map makes room and tries again."""
        for _ in range(3):
            try:
                with self._env.begin(write=write) as txn:
                    return succeed(work(txn))
            except lmdb.MapFullError:
                self._make_room()
            except lmdb.MapResizedError:
                self._env.set_mapsize(0)  # another process grew the map: adopt its size
            except lmdb.Error as error:
                return self._failed(error)
        return self._failed(lmdb.MapFullError("the map stays full after evicting"))

    def _make_room(self, batch: int = 32) -> None:
        """Evict the oldest eighth of the records, in small transactions (deleting needs pages too).

        When not even a small eviction fits, the map grows once by half: a
        handshake never fails on a full map.
        """
        target, evicted, grown = max(1, len(self) // 8), 0, False
        for _ in range(target // batch + 4):
            if evicted >= target:
                break
            try:
                with self._env.begin(write=True) as txn:
                    dropped = self._drop_oldest(txn, min(batch, target - evicted), 0)[0]
            except lmdb.MapFullError:
                if grown:
                    break
                grown = True
                self._env.set_mapsize(int(self._env.info()["map_size"] * 1.5))
                continue
            except lmdb.Error as error:
                self._failed(error)
                break
            if not dropped:
                break
            evicted += dropped
            self.counts["store_evicted"] += dropped

    def _failed(self, error: Exception) -> Deferred[Any]:
        self.counts["store_errors"] += 1
        if self.counts["store_errors"] == 1:
            self.log.warn("LMDB store {path} failed: {error}; further failures are only counted",
                          path=self.path, error=error)
        return fail(error)


def _open_environment(path: str, map_size: int) -> Any:
    if os.path.exists(path) and not os.path.isdir(path):
        raise StoreFileError(f"lmdb store {path!r} is not a directory (lmdb:DIRECTORY)")
    data = os.path.join(path, "data.mdb")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        if os.path.exists(data):
            if os.path.getsize(data) == 0:
                raise StoreFileError(f"lmdb store {data!r} is empty (truncated?): move it away to start afresh")
            _check_length(data)
        env = lmdb.open(path, map_size=map_size, subdir=True, max_dbs=4, sync=False, metasync=False, writemap=True,
                        readahead=False, mode=0o600, create=True)
    except lmdb.Error as error:
        raise StoreFileError(f"{data!r} is not a usable LMDB environment ({error}): move it away to start afresh") \
            from None
    except OSError as error:
        raise StoreFileError(f"cannot open lmdb store {path!r}: {error.strerror}") from None
    return env


def _check_length(data: str) -> None:
    """Refuse a file shorter than the pages its newest header names, before LMDB maps it.

    Opened with ``writemap``, LMDB would extend a truncated file with zeros
    and read them as pages; without it, reading past the end crashes the
    process (SIGBUS). The header (``MDB_meta`` in LMDB's mdb.c) is read here:
    two meta pages, each with a magic, the page size, the last page number
    and a transaction ID; the newer one counts.
    """
    try:
        with open(data, "rb") as file:
            head = file.read(_META_END)
            size = os.fstat(file.fileno()).st_size
            if len(head) < _META_END or struct.unpack_from("<I", head, _MAGIC)[0] != LMDB_MAGIC:
                return  # not LMDB at all: lmdb.open says so
            psize = struct.unpack_from("<I", head, _PSIZE)[0]
            if not 512 <= psize <= 65536:
                return
            file.seek(psize)
            second = file.read(_META_END)
    except OSError:
        return
    metas = [struct.unpack_from("<QQ", page, _LAST_PAGE) for page in (head, second)
             if len(page) == _META_END and struct.unpack_from("<I", page, _MAGIC)[0] == LMDB_MAGIC]
    last_page, _ = max(metas, key=lambda meta: meta[1])
    needed = (last_page + 1) * psize
    if size < needed:
        raise StoreFileError(f"lmdb store {data!r} is truncated ({size} of {needed} bytes): "
                             "move it away to start afresh")


def _check_format(env: Any, path: str) -> tuple[Any, Any]:
    """The records and expiry databases, after checking (or, in an empty environment, writing) the marker."""
    try:
        with env.begin(write=True) as txn:
            main = txn.stat(env.open_db(None, txn=txn))
            if main["entries"] == 0:
                meta = env.open_db(b"meta", txn=txn)
                txn.put(b"format", FORMAT, db=meta)
            elif txn.get(b"meta") is None:
                raise StoreFileError(f"{path!r} holds an LMDB environment that is not a twisted-sesscache "
                                     "store: give another directory")
            else:
                meta = env.open_db(b"meta", txn=txn, create=False)
                found = txn.get(b"format", db=meta)
                if found != FORMAT:
                    raise StoreFileError(f"{path!r} holds {found!r} records, not {FORMAT!r}: give another "
                                         "directory, or move this one away")
            records = env.open_db(b"records", txn=txn)
            expiries = env.open_db(b"expiries", txn=txn)
    except lmdb.Error as error:
        raise StoreFileError(f"{path!r} is not a usable twisted-sesscache store ({error}): give another "
                             "directory, or move this one away") from None
    return records, expiries


__all__ = ["FORMAT", "LMDBStore", "StoreFileError"]

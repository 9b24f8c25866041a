"""``python -m bench.lmdb_cost``: microseconds per LMDB store lookup and write, beside the memory store.

What a handshake pays for the store: ``get`` of a session that is there (a
resumption), ``get`` of one that is not (a new client offering a stale ID),
``set`` (a new session, with the size bound evicting the oldest), ``take``
(a single-use client ticket), and the whole server-side path the prefetch
runs (store lookup, unsealing, the Deferred and its timeout). Each figure is
the median of several timed batches, in CPU microseconds per call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from twisted_sesscache.sealing import Sealer
from twisted_sesscache.stores.lmdb import LMDBStore
from twisted_sesscache.stores.memory import MemoryStore
from twisted_sesscache.stores.sealed import SealedRecords, record_context

RECORD = os.urandom(180)  # a TLS 1.2 server session's DER is 100 to 200 bytes


def per_call(operation: Callable[[int], Any], count: int, batches: int = 7) -> float:
    """Median over ``batches`` of the CPU microseconds one call of ``operation(i)`` takes.

    Process CPU time, not wall time: on a shared machine other processes'
    turns would otherwise count as the store's.
    """
    timings = []
    for batch in range(batches):
        start = time.process_time()
        for i in range(batch * count, (batch + 1) * count):
            operation(i)
        timings.append((time.process_time() - start) / count * 1e6)
    return statistics.median(timings)


def key(i: int) -> bytes:
    return b"0123456789abcdef:" + (b"%064x" % i)


def measure(store: Any, entries: int, count: int) -> dict[str, float]:
    sealer = Sealer([os.urandom(32)])
    # A record opens only under the name it was sealed for (record_context), so each key gets its own.
    sealed = [sealer.seal(RECORD, kind=b"session", context=record_context(key(i), b"ctx")) for i in range(entries)]
    for i in range(entries):
        store.set(key(i), sealed[i], 300)
    from twisted.internet import reactor  # the real one: its callLater is what a lookup's timeout costs

    records = SealedRecords(store, sealer, b"session", timeout=0.05, reactor=reactor)
    results = {
        "get, hit": per_call(lambda i: store.get(key(i % entries)), count),
        "get, miss": per_call(lambda i: store.get(key(entries + i)), count),
        "server lookup, hit (SealedRecords.fetch: get + unseal)": per_call(
            lambda i: records.fetch(key(i % entries), b"ctx", bytes), count
        ),
        "set (at the bound: evicts the oldest)": per_call(lambda i: store.set(key(entries + i), sealed[i % entries], 300), count),
        "take, hit": per_call(lambda i: store.take(key(entries + i)), count),
    }
    assert records.counts["store_hits"] == 7 * count, records.counts  # the lookups did find their records
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=20480, help="records in the store (its size bound)")
    parser.add_argument("--count", type=int, default=5000, help="calls per timed batch")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lmdb-cost-") as directory:
        results = {
            "lmdb": measure(LMDBStore(os.path.join(directory, "s"), args.entries), args.entries, args.count),
            "memory": measure(MemoryStore(args.entries), args.entries, args.count),
        }
    print(f"{args.entries} records of {len(RECORD)} bytes (sealed), CPU microseconds per call")
    print(f"{'operation':52} {'lmdb µs':>9} {'memory µs':>10}")
    for name in results["lmdb"]:
        print(f"{name:52} {results['lmdb'][name]:9.1f} {results['memory'][name]:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the workers of ``twistd sesscache --workers N`` did during one run, from their ``/stats.json``.

The parent's ``/stats.json`` sums the workers and lists each one under
``per_worker`` (twisted_sesscache/workerstats.py). The bench reads it before
and after a run; the difference says how the kernel spread the connections
over the workers and how many resumptions each worker answered from the
shared store rather than from its own OpenSSL cache.

OpenSSL counts every resumption in ``hits`` and, among them, those whose
session came from the get-session callback, i.e. the store, in ``cb_hits``.
A worker's own sessions are in its OpenSSL cache, so a ``cb_hit`` is a
session that worker did not make: another worker did (or it had dropped it,
which a cache far from full does not). Under TLS 1.3 every resumption issues
a new session, made by the worker that answered, so ``cb_hits / hits`` is the
share of resumptions answered by another worker than the one that made the
session. Under TLS 1.2 a resumed session keeps its ID: the first resumption on
a second worker is a ``cb_hit``, and that worker then holds it in its own
cache, so ``cb_hits`` counts sessions that moved, a lower bound.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

HOST = "127.0.0.1"
COUNTS = ("accept", "hits", "cb_hits", "misses", "store_hits", "store_misses", "store_writes")
READY_TIMEOUT = 30.0


def snapshot(port: int, timeout: float = 5.0) -> dict[str, Any] | None:
    """The parent's ``/stats.json``, or None when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/stats.json", timeout=timeout) as answer:
            loaded: dict[str, Any] = json.loads(answer.read())
            return loaded
    except (OSError, ValueError):
        return None


def snapshots(ports: Sequence[int]) -> list[dict[str, Any] | None]:
    return [snapshot(port) for port in ports]


def wait_ready(port: int, timeout: float = READY_TIMEOUT) -> bool:
    """True once every worker answers the parent (they accept only after start-up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = snapshot(port)
        if stats and stats.get("workers_answering", 0) >= stats.get("workers", 1) > 0:
            return True
        if stats and "workers" not in stats:  # one process: no pool to wait for
            return True
        time.sleep(0.1)
    return False


def _workers(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-worker counts; a single process (``--workers 1``) is one worker."""
    return list(stats.get("per_worker") or [stats])


def _count(stats: dict[str, Any], key: str) -> int:
    value = stats.get(key)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def difference(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    """What each worker counted between two snapshots (a replaced worker counts from zero)."""
    if after is None:
        return None
    earlier = {(w.get("worker"), w.get("pid")): w for w in _workers(before or {})} if before else {}
    workers = []
    for worker in _workers(after):
        start = earlier.get((worker.get("worker"), worker.get("pid")), {})
        workers.append({"worker": worker.get("worker", 0), **{k: _count(worker, k) - _count(start, k) for k in COUNTS}})
    return summarise(workers)


def summarise(workers: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals, the share of resumptions answered from the store, and how evenly the workers were loaded."""
    totals = {key: sum(w[key] for w in workers) for key in COUNTS}
    accepted = [w["accept"] for w in workers]
    return {
        "workers": len(workers),
        **totals,
        "cross_worker": totals["cb_hits"] / totals["hits"] if totals["hits"] else None,
        "busiest_share": max(accepted) / totals["accept"] if totals["accept"] else None,
        "per_worker": workers,
    }


def combined(parts: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One summary of several processes' differences (copies of a configuration), None if none answered."""
    known = [p for p in parts if p is not None]
    if not known:
        return None
    return summarise([w for part in known for w in part["per_worker"]])

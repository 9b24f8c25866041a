"""Statistics over all workers: ``/stats.json`` and ``/metrics`` served once, by the parent.

Each request asks every worker for its ``SessionCache.stats()`` (over its
command pipe) and answers with their sum, plus ``workers`` and a
``per_worker`` breakdown. Counters and per-process gauges are summed;
settings that every worker shares are shown once; a gauge of the one store
they all share (``store_entries``) is the largest any worker saw, not a sum of
the same records counted N times.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from twisted_sesscache.metrics import registry_for
from twisted_sesscache.status import StatsIndex, StatsSite

if TYPE_CHECKING:
    from twisted_sesscache.workers import WorkerPool

SETTINGS_KEYS = frozenset(("size_limit", "timeout"))  # the same in every worker: shown once
SHARED_GAUGES = frozenset(("store_entries",))  # one store seen by every worker: the largest


def combine(per_worker: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary of several workers' statistics (nested dictionaries alike)."""
    keys: dict[str, None] = {}
    for stats in per_worker:
        keys.update(dict.fromkeys(stats))
    summary: dict[str, Any] = {}
    for key in keys:
        values = [stats[key] for stats in per_worker if key in stats]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if all(isinstance(v, dict) for v in values):
            summary[key] = combine(values)
        elif numbers and (key in SETTINGS_KEYS or key in SHARED_GAUGES):
            summary[key] = max(numbers)
        elif numbers:
            summary[key] = sum(numbers)
        else:
            distinct = list(dict.fromkeys(json.dumps(v, sort_keys=True) for v in values))
            summary[key] = values[0] if len(distinct) == 1 else [json.loads(v) for v in distinct]
    return summary


def pool_stats(pool: WorkerPool) -> Any:
    """Deferred: the summed statistics with ``workers`` and ``per_worker``."""

    def summed(answers: list[dict[str, Any]]) -> dict[str, Any]:
        per_worker = [{key: value for key, value in answer.items() if key != "stats"} | answer.get("stats", {})
                      for answer in answers]
        answering = [answer.get("stats", {}) for answer in answers if "stats" in answer]
        summary = combine(answering)
        summary.update(workers=pool.count, workers_answering=len(answering), per_worker=per_worker)
        return summary

    return pool.ask_all("stats").addCallback(summed)


class _Snapshot:
    """What metrics.SessionCacheCollector reads, for statistics already gathered."""

    def __init__(self, stats: dict[str, Any]) -> None:
        self._stats = stats

    def stats(self) -> dict[str, Any]:
        return self._stats


class _Asynchronous(Resource):
    isLeaf = True

    def __init__(self, pool: WorkerPool) -> None:
        super().__init__()
        self.pool = pool

    def render_GET(self, request: Request) -> Any:
        def write(stats: dict[str, Any]) -> None:
            content_type, body = self.render_stats(stats)
            request.setHeader(b"content-type", content_type)
            request.setHeader(b"cache-control", b"no-store")
            request.write(body)
            request.finish()

        def failed(failure: Any) -> None:
            request.setResponseCode(500)
            request.write(f"statistics failed: {failure.getErrorMessage()}\n".encode())
            request.finish()

        pool_stats(self.pool).addCallbacks(write, failed)
        return NOT_DONE_YET

    def render_stats(self, stats: dict[str, Any]) -> tuple[bytes, bytes]:
        raise NotImplementedError


class PoolStatsJSON(_Asynchronous):
    def render_stats(self, stats: dict[str, Any]) -> tuple[bytes, bytes]:
        return b"application/json", json.dumps(stats, indent=2, sort_keys=True).encode() + b"\n"


class PoolMetrics(_Asynchronous):
    def render_stats(self, stats: dict[str, Any]) -> tuple[bytes, bytes]:
        registry = registry_for(_Snapshot(stats))  # type: ignore[arg-type]
        return CONTENT_TYPE_LATEST.encode(), generate_latest(registry)


def pool_stats_site(pool: WorkerPool) -> StatsSite:
    root = Resource()
    root.putChild(b"", StatsIndex())
    root.putChild(b"stats.json", PoolStatsJSON(pool))
    root.putChild(b"metrics", PoolMetrics(pool))
    site = StatsSite(root)
    site.displayTracebacks = False
    return site


__all__ = ["PoolMetrics", "PoolStatsJSON", "combine", "pool_stats", "pool_stats_site"]

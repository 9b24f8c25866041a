"""Prometheus exposition of ``SessionCache.stats()``, read at scrape time.

The counters live in OpenSSL (or, in the bundled runtime, in the cache); a
custom collector reads them when Prometheus asks instead of mirroring them
into client-library metrics that could drift. Each cache gets its own
registry, so that nothing leaks into (or out of) the process-wide one.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any, cast

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.registry import Collector
from twisted.python import threadable
from twisted.web.resource import Resource

from twisted_sesscache import __version__
from twisted_sesscache.cache import SessionCache

PREFIX = "sesscache_"

# stats() key -> (metric name without prefix, kind, help). Counters get "_total" on exposition.
METRICS: dict[str, tuple[str, str, str]] = {
    "number": ("sessions", "gauge", "Sessions in the cache (SSL_CTX_sess_number)"),
    "size_limit": ("size_limit", "gauge", "Maximum number of cached sessions; 0 means no limit"),
    "timeout": ("timeout_seconds", "gauge", "Session lifetime in seconds"),
    "contexts": ("contexts", "gauge", "SSL contexts managed by the cache"),
    "connect": ("connect", "counter", "Client handshakes started"),
    "connect_good": ("connect_good", "counter", "Client handshakes completed"),
    "connect_renegotiate": ("connect_renegotiate", "counter", "Client renegotiations started"),
    "accept": ("accept", "counter", "Server handshakes started"),
    "accept_good": ("accept_good", "counter", "Server handshakes completed"),
    "accept_renegotiate": ("accept_renegotiate", "counter", "Server renegotiations started"),
    "hits": ("hits", "counter", "Sessions resumed"),
    "cb_hits": ("cb_hits", "counter", "Sessions resumed from the external store callback"),
    "misses": ("misses", "counter", "Sessions offered by clients but not resumed"),
    "timeouts": ("timeouts", "counter", "Sessions offered by clients but expired"),
    "cache_full": ("cache_full", "counter", "Sessions evicted because the cache was full"),
    "flushes": ("flushes", "counter", "Scheduled or explicit flush runs"),
    "flushed": ("flushed", "counter", "Sessions removed by flush runs"),
    "store_errors": ("store_errors", "counter", "Store calls that failed or were refused"),
    "store_hits": ("store_hits", "counter", "Offered sessions found in the store"),
    "store_misses": ("store_misses", "counter", "Offered sessions not in the store"),
    "store_timeouts": ("store_timeouts", "counter", "Store lookups that did not answer in time"),
    "store_rejected": ("store_rejected", "counter", "Stored records dropped: not sealed for us or not a session"),
    "store_writes": ("store_writes", "counter", "Sessions written to the store"),
    "store_lookup_errors": ("store_lookup_errors", "counter", "Store lookups that failed (not timeouts, not misses)"),
    "store_foreign_key": ("store_foreign_key", "counter", "Stored records sealed under a key this process does not hold"),
    "handshake_failures": ("handshake_failures", "counter", "TLS handshakes that failed before completing"),
    "handshake_timeouts": ("handshake_timeouts", "counter", "TLS handshakes dropped for not completing in time"),
}
LABELS = ("runtime", "mode")
# Keys of stats()["client"] that only grow; the others are exported as gauges.
CLIENT_COUNTERS = frozenset(
    ("connect", "connect_good", "hits", "misses", "offered", "invalidated", "expired", "evicted",
     "store_hits", "store_misses", "store_timeouts", "store_rejected", "store_writes")
)


def metric_name(key: str) -> str:
    """The exposed name of a ``stats()`` key (counters carry Prometheus' ``_total``)."""
    name, kind, _ = METRICS.get(key, (_sanitize(key), "gauge", ""))
    return PREFIX + name + ("_total" if kind == "counter" else "")


def _sanitize(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


class SessionCacheCollector(Collector):
    """Yields the cache's statistics as metrics each time the registry is scraped.

    Values that the runtime cannot observe are ``None`` in ``stats()`` and are
    left out here rather than exported as a made-up 0. Numeric keys this module
    does not know yet (added by later features) are exported as gauges.
    """

    def __init__(self, cache: SessionCache, reactor: Any = None, timeout: float = 5) -> None:
        self.cache = cache
        self.reactor = reactor
        self.timeout = timeout

    def _stats(self) -> dict[str, Any]:
        """``cache.stats()``, read on the reactor thread, which owns the cache and its contexts.

        MetricsResource scrapes from a WSGI thread. The wait is bounded (unlike
        ``blockingCallFromThread``): at shutdown the reactor joins its thread
        pool and would never answer a scrape that is still waiting for it.
        """
        if self.reactor is None or threadable.isInIOThread():
            return self.cache.stats()
        done = threading.Event()
        result: dict[str, Any] = {}

        def read() -> None:
            try:
                result["stats"] = self.cache.stats()
            except Exception as error:  # handed to the scraping thread
                result["error"] = error
            finally:
                done.set()

        self.reactor.callFromThread(read)
        if not done.wait(self.timeout):
            raise TimeoutError(f"the reactor did not hand over the session-cache statistics in {self.timeout} s")
        if "error" in result:
            raise result["error"]
        return result["stats"]

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        labels = [str(stats.get(label, "")) for label in LABELS]
        info = GaugeMetricFamily(
            PREFIX + "info", "Version, runtime and cache mode (value always 1)", labels=[*LABELS, "version"]
        )
        info.add_metric([*labels, __version__], 1)
        yield info
        for key, value in stats.get("client", {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                family_type = CounterMetricFamily if key in CLIENT_COUNTERS else GaugeMetricFamily
                yield family_type(PREFIX + "client_" + _sanitize(key), f"Client side: {key}", value=value)
        for key, value in stats.items():
            if key in LABELS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name, kind, documentation = METRICS.get(key, (_sanitize(key), "gauge", f"{key} from SessionCache.stats()"))
            family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family_type(PREFIX + name, documentation, value=value)

    def describe(self) -> list[Metric]:
        # Nothing to check against at registration; avoids a scrape at start-up.
        return []


def registry_for(cache: SessionCache, reactor: Any = None) -> CollectorRegistry:
    """A registry of its own holding only this cache's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SessionCacheCollector(cache, reactor))
    # What operators expect beside the cache's own: the process and the interpreter.
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def metrics_resource(cache: SessionCache, reactor: Any) -> Resource:
    """``/metrics``: prometheus-client's Twisted resource on the cache's own registry."""
    from prometheus_client.twisted import MetricsResource  # imports the global reactor

    return cast(Resource, MetricsResource(registry_for(cache, reactor)))  # a WSGIResource, which is a Resource


__all__ = ["METRICS", "SessionCacheCollector", "metric_name", "metrics_resource", "registry_for"]

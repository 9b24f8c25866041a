"""One cache's statistics, as ``SessionCache.stats()``, ``/stats.json`` and ``/metrics`` show them.

Under the shared runtime the session counters are OpenSSL's own
(``SSL_CTX_sess_*``, summed over the cache's contexts); under the bundled
runtime only what handshakes show is counted, and the rest is ``None`` rather
than a made-up zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted_sesscache._openssl import COUNTERS

if TYPE_CHECKING:
    from twisted_sesscache.cache import SessionCache


def cache_stats(cache: SessionCache) -> dict[str, Any]:
    config, server = cache.config, cache.server
    summary: dict[str, Any] = {
        "runtime": cache.runtime.name,
        "mode": cache.mode.spelled(),
        "size_limit": config.size_limit,
        "timeout": config.timeout,
        "contexts": len(server.contexts),
    }
    if cache.runtime.shared:
        summary.update(server.counters())
    else:
        summary.update(dict.fromkeys(COUNTERS))
        summary.update(server.observed)
    summary["flushes"] = cache.flushing.flushes
    summary["flushed"] = cache.flushing.flushed
    if cache.sharing is not None:
        summary.update(cache.sharing.stats())
    if cache._client is not None:
        summary["client"] = cache._client.stats()
    return summary


__all__ = ["cache_stats"]

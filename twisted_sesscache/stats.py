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
    from twisted_sesscache.client.cache import ClientSessionCache
    from twisted_sesscache.config import CacheConfig
    from twisted_sesscache.server.contexts import ServerContexts
    from twisted_sesscache.server.flush import FlushSchedule
    from twisted_sesscache.sharing import Sharing


def cache_stats(
    config: CacheConfig,
    server: ServerContexts,
    flushing: FlushSchedule,
    sharing: Sharing | None,
    client: ClientSessionCache | None,
) -> dict[str, Any]:
    """The summary of one cache's parts; ``client`` only once the client side is in use."""
    runtime = server.runtime
    summary: dict[str, Any] = {
        "runtime": runtime.name,
        "mode": config.effective_mode.spelled(),
        "size_limit": config.size_limit,
        "timeout": config.timeout,
        "contexts": len(server.contexts),
    }
    if runtime.shared:
        summary.update(server.counters())
    else:
        summary.update(dict.fromkeys(COUNTERS))
        summary.update(server.observed)
    summary["flushes"] = flushing.flushes
    summary["flushed"] = flushing.flushed
    if sharing is not None:
        summary.update(sharing.stats())
    if client is not None:
        summary["client"] = client.stats()
    return summary


__all__ = ["cache_stats"]

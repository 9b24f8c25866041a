"""What ``twistd sesscache`` serves without ``--upstream``, and its statistics listener.

The status page answers "did my session resume?" for the visitor's own TLS
connection, next to the cache's counters, so that resumption can be watched
with nothing but a browser or ``openssl s_client``. The stats listener is a
plain HTTP site for machines: ``/stats.json`` and Prometheus' ``/metrics``.
"""

from __future__ import annotations

import html
import json
from typing import Any

from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from twisted_sesscache import __version__
from twisted_sesscache.cache import SessionCache

SESSION_FILE = "/tmp/sesscache-session.pem"


def connection_info(request: Request) -> dict[str, Any]:
    """Protocol, cipher and resumption of the TLS connection ``request`` came in on."""
    transport = getattr(request.channel, "transport", None)
    handle = transport.getHandle() if transport is not None and hasattr(transport, "getHandle") else None
    if handle is None or not hasattr(handle, "get_protocol_version_name"):
        return {"tls": False, "protocol": None, "cipher": None, "resumed": None}
    return {
        "tls": True,
        "protocol": handle.get_protocol_version_name(),
        "cipher": handle.get_cipher_name(),
        "resumed": bool(handle.resumed) if hasattr(handle, "resumed") else None,
    }


def watch_commands(host: str, port: int) -> list[str]:
    """Two ``openssl s_client`` runs: the first saves a session, the second offers it back.

    ``-ign_eof`` and a request that gets an answer make sure a TLS 1.3 ticket
    has arrived before the session is saved.
    """
    connect = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | openssl s_client -connect {host}:{port} -ign_eof"
    show = "| grep -E '^(New|Reused),'"
    return [f"{connect} -sess_out {SESSION_FILE} {show}", f"{connect} -sess_in {SESSION_FILE} {show}"]


def _address(request: Request) -> tuple[str, int]:
    host = request.getHost()
    address = getattr(host, "host", "127.0.0.1")
    if ":" in address:
        address = f"[{address}]"
    return address, int(getattr(host, "port", 0))


def _json(request: Request, value: Any) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(value, indent=2, sort_keys=True).encode("utf-8") + b"\n"


class StatusJSON(Resource):
    """``/status.json``: the status page as data."""

    isLeaf = True

    def __init__(self, cache: SessionCache) -> None:
        super().__init__()
        self.cache = cache

    def render_GET(self, request: Request) -> bytes:
        return _json(request, status(request, self.cache))


def status(request: Request, cache: SessionCache) -> dict[str, Any]:
    host, port = _address(request)
    stats = cache.stats()
    return {
        "connection": connection_info(request),
        "cache": stats,
        "hit_rate": hit_rate(stats),
        "version": __version__,
        "watch": watch_commands(host, port),
    }


class StatusPage(Resource):
    """``/``: the visitor's own connection and the cache statistics, in plain HTML.

    Each response closes its connection, so that a reload makes a new TLS
    connection and shows whether *that* one resumed; a kept-alive connection
    would show the same first handshake over and over.
    """

    def __init__(self, cache: SessionCache) -> None:
        super().__init__()
        self.cache = cache
        self.putChild(b"status.json", StatusJSON(cache))

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        return super().getChild(path, request)

    def render_GET(self, request: Request) -> bytes:
        if hasattr(request.channel, "persistent"):
            request.channel.persistent = False
        request.setHeader(b"connection", b"close")
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return render_html(status(request, self.cache)).encode("utf-8")


def _yes_no(value: Any) -> str:
    return "unknown" if value is None else ("yes" if value else "no")


def hit_rate(stats: dict[str, Any]) -> float | None:
    """Resumed handshakes as a share of completed ones; None before the first."""
    hits, completed = stats.get("hits"), stats.get("accept_good")
    if not isinstance(hits, int) or not isinstance(completed, int) or completed <= 0:
        return None
    return round(hits / completed, 4)


def render_html(info: dict[str, Any]) -> str:
    connection = info["connection"]
    resumed = connection["resumed"]
    headline = {True: "Resumed: this connection reused an earlier TLS session.",
                False: "New session: this connection made a full handshake.",
                None: "This connection is not TLS."}[resumed]
    rows = "".join(
        f"<tr><th>{html.escape(str(key))}</th><td>{html.escape('n/a' if value is None else str(value))}</td></tr>"
        for key, value in info["cache"].items()
    )
    commands = "".join(f"<pre>{html.escape(command)}</pre>" for command in info["watch"])
    rate = info.get("hit_rate")
    shown_rate = "n/a" if rate is None else f"{rate:.1%} of completed handshakes resumed"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>twisted-sesscache</title>
<style>body{{font-family:sans-serif;max-width:46em;margin:2em auto;line-height:1.4}}
th{{text-align:left;padding-right:2em;font-weight:normal;color:#555}}pre{{background:#f4f4f4;padding:.5em;overflow-x:auto}}</style>
</head><body>
<h1>twisted-sesscache</h1>
<p><strong>{html.escape(headline)}</strong></p>
<p>Hit rate: {html.escape(shown_rate)}</p>
<table>
<tr><th>protocol</th><td>{html.escape(str(connection["protocol"]))}</td></tr>
<tr><th>cipher</th><td>{html.escape(str(connection["cipher"]))}</td></tr>
<tr><th>session resumed</th><td>{_yes_no(resumed)}</td></tr>
</table>
<h2>Watch resumption</h2>
<p>Reload this page: each response closes its connection, so the reload makes a new
TLS connection, which should say <em>Resumed</em>. Or run these two commands; the
second prints <code>Reused</code>:</p>
{commands}
<h2>Session cache</h2>
<table>{rows}</table>
<p>The same as JSON: <a href="/status.json">/status.json</a>. Counters that this runtime
cannot observe show n/a. twisted-sesscache {html.escape(info["version"])}.</p>
</body></html>
"""


class StatsJSON(Resource):
    """``/stats.json``: ``SessionCache.stats()`` as JSON."""

    isLeaf = True

    def __init__(self, cache: SessionCache) -> None:
        super().__init__()
        self.cache = cache

    def render_GET(self, request: Request) -> bytes:
        return _json(request, self.cache.stats())


class StatsIndex(Resource):
    """``/`` of the stats listener: points at what it serves."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"twisted-sesscache statistics: /stats.json (JSON), /metrics (Prometheus)\n"


def stats_resource(cache: SessionCache, reactor: Any) -> Resource:
    """The stats listener's tree: ``/stats.json`` and ``/metrics``."""
    from twisted_sesscache.metrics import metrics_resource

    root = Resource()
    root.putChild(b"", StatsIndex())
    root.putChild(b"stats.json", StatsJSON(cache))
    root.putChild(b"metrics", metrics_resource(cache, reactor))
    return root


class StatsSite(Site):
    """A Site without an access log line per request: scrapers come every few seconds."""

    def log(self, request: http.Request) -> None:
        pass


def status_site(cache: SessionCache) -> Site:
    site = Site(StatusPage(cache))
    site.displayTracebacks = False
    return site


def stats_site(cache: SessionCache, reactor: Any) -> Site:
    site = StatsSite(stats_resource(cache, reactor))
    site.displayTracebacks = False
    return site


__all__ = [
    "StatsJSON",
    "StatusJSON",
    "StatusPage",
    "connection_info",
    "render_html",
    "stats_resource",
    "stats_site",
    "status",
    "status_site",
    "watch_commands",
]

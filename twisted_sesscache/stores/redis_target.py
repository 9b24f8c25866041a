"""Where a Redis store connects, read from its URL: one parser for every form operators write.

``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS, the server's
certificate verified), ``redis+sentinel://h1:26379,h2:26379/SERVICE/DB``
(``rediss+sentinel://`` for TLS to the data nodes). Query parameters:
``ca=/path/ca.pem`` (trust root for TLS; the platform's otherwise),
``sni=name`` (the name the certificate must carry, for IP-addressed Redis),
``timeout=seconds`` (reply timeout per request, counted from when it is sent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel")
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class RedisTarget:
    """A Redis server, or a Sentinel-monitored service, and how to log in to it."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca: str | None = None
    sni: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    timeout: float | None = None

    @property
    def address(self) -> str:
        """For log lines and status: never the password."""
        if self.sentinels:
            nodes = ",".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"sentinel {nodes}/{self.service}/{self.db}"
        return f"{self.host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisTarget:
    """The target a URL names; ValueError with one line saying what is wrong."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"not a Redis URL: {url!r}")
    query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    unknown = set(query) - {"ca", "sni", "timeout"}
    if unknown:
        raise ValueError(f"bad Redis URL {url!r}: unknown parameter {sorted(unknown)[0]!r}")
    common = dict(
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=scheme.startswith("rediss"),
        ca=query.get("ca"),
        sni=query.get("sni"),
        timeout=_seconds(url, query.get("timeout")),
    )
    if common["username"] and common["password"] is None:
        # redis://secret@host: a lone user part is the password, as redis-cli reads it
        common["username"], common["password"] = None, common["username"]
    if scheme.endswith("+sentinel"):
        return _sentinel_target(url, parts.netloc.rpartition("@")[2], parts.path, common)
    try:
        db = int(parts.path.strip("/") or 0)
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"bad Redis URL {url!r}: port and database must be numbers") from None
    return RedisTarget(host=parts.hostname or "127.0.0.1", port=port, db=db, **common)  # type: ignore[arg-type]


def _sentinel_target(url: str, nodes: str, path: str, common: dict[str, Any]) -> RedisTarget:
    sentinels = []
    for node in filter(None, nodes.split(",")):
        host, colon, port = node.rpartition(":")
        if not colon or "]" in port:
            host, port = node, str(DEFAULT_SENTINEL_PORT)
        if not port.isdigit():
            raise ValueError(f"bad Redis Sentinel URL {url!r}: port of {node!r} must be a number")
        sentinels.append((host.strip("[]") or "127.0.0.1", int(port)))
    pieces = [piece for piece in path.split("/") if piece]
    if not sentinels or not pieces or len(pieces) > 2:
        raise ValueError(f"bad Redis Sentinel URL {url!r}: expected redis+sentinel://host:port[,host:port]/SERVICE[/DB]")
    if len(pieces) == 2 and not pieces[1].isdigit():
        raise ValueError(f"bad Redis Sentinel URL {url!r}: database must be a number")
    db = int(pieces[1]) if len(pieces) == 2 else 0
    return RedisTarget(host=sentinels[0][0], port=sentinels[0][1], db=db, sentinels=tuple(sentinels),
                       service=unquote(pieces[0]), **common)


def _seconds(url: str, text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"bad Redis URL {url!r}: timeout must be a positive number of seconds")
    return value


__all__ = ["RedisTarget", "parse_redis_url"]

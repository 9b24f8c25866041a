"""A tiny Twisted TLS server in one of its configurations, for the bench to start as a subprocess.

Run as ``python -m bench.tlsserver CONFIG --port N --certificate C
--private-key K``. Every request gets the same small HTTP/1.0 answer and a clean
TLS close, so that the servers differ only in how they handle sessions. The
path ``/stats`` answers with the cache statistics and the process's RSS instead,
which lets the bench check what the server saw.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from twisted.internet import protocol

BODY = b"ok\n"
ANSWER = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\n" + BODY
CONFIGS = ("default", "sessions", "sesscache", "sesscache-memstore", "sesscache-lmdb", "sesscache-redis")


def rss_bytes() -> int:
    """Resident set size of this process (Linux), 0 where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Answer(protocol.Protocol):
    """Reads one request head, answers it, closes (close_notify first)."""

    def connectionMade(self) -> None:
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if b"\r\n\r\n" not in self._buffer:
            return
        transport: Any = self.transport
        if self._buffer.startswith(b"GET /stats "):
            body = json.dumps(self.factory.stats()).encode()
            transport.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + body)
        else:
            transport.write(ANSWER)
        transport.loseConnection()


def make_creator(
    config: str,
    certificate: str,
    private_key: str,
    store_dir: str = ".",
    store_url: str = "",
    tickets: str = "no",
    flush_interval: float | None = None,
) -> tuple[Any, Any]:
    """The connection creator for ``config`` and the SessionCache behind it (or None).

    ``store_dir``: where ``sesscache-lmdb`` keeps its environment and the key
    file (``sesscache-redis`` its key file, shared by the processes that share
    ``store_url``). ``tickets``: the Redis configuration's ``tickets`` setting;
    ``flush_interval``: every SessionCache's (None: its default).
    """
    import os

    from twisted_sesscache import SessionCache
    from twisted_sesscache.certs import certificate_options
    from twisted_sesscache.stores.memory import MemoryStore

    if config == "default":
        return certificate_options(certificate, private_key), None
    if config == "sessions":
        return certificate_options(certificate, private_key, enableSessions=True), None
    key_file = os.path.join(store_dir, "store.key")
    choices: dict[str, dict[str, Any]] = {
        "sesscache": {},
        "sesscache-memstore": {"store": MemoryStore()},
        "sesscache-lmdb": {"store": f"lmdb:{os.path.join(store_dir, 'lmdb')}", "store_key_file": key_file},
        "sesscache-redis": {"store": store_url, "store_key_file": key_file, "tickets": tickets},
    }
    settings = choices.get(config)
    if settings is None:
        raise ValueError(f"unknown configuration {config!r}; expected one of {', '.join(CONFIGS)}")
    if flush_interval is not None:
        settings["flush_interval"] = flush_interval
    cache = SessionCache(**settings)
    return cache.server_context_factory(certificate_options(certificate, private_key)), cache


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", choices=CONFIGS)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--certificate", required=True)
    parser.add_argument("--private-key", required=True)
    parser.add_argument("--store-dir", default=".", help="sesscache-lmdb, -redis: directory of the store's key")
    parser.add_argument("--store-url", default="", help="sesscache-redis: redis://HOST:PORT/DB")
    parser.add_argument("--tickets", default="no", help="sesscache-redis: no, yes or shared (SessionCache(tickets=))")
    parser.add_argument("--flush-interval", type=float, default=None, help="sesscache-*: SessionCache(flush_interval=)")
    args = parser.parse_args(argv)

    from twisted.internet import reactor as installed

    reactor: Any = installed
    creator, cache = make_creator(
        args.config, args.certificate, args.private_key, args.store_dir, args.store_url, args.tickets,
        args.flush_interval,
    )  # fmt: skip
    factory = protocol.Factory.forProtocol(Answer)
    if cache is not None:
        cache.start()  # as README's embedding does: the reactor's flush, and shared ticket keys

    def stats() -> dict[str, Any]:
        return {"config": args.config, "rss": rss_bytes(), "cache": cache.stats() if cache else None}

    factory.stats = stats  # type: ignore[attr-defined]
    reactor.listenSSL(args.port, factory, creator, backlog=1024, interface="127.0.0.1")
    print(f"listening on 127.0.0.1:{args.port} ({args.config})", file=sys.stderr, flush=True)
    reactor.run()


if __name__ == "__main__":
    main()

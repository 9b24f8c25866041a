"""Bytes per session in the shared stores, LMDB and Redis, as ``twistd sesscache`` writes them.

Real servers, real sessions: a ``twistd sesscache`` with the store is sent a
number of full handshakes (each leaves one session in the store under TLS 1.2,
and as many as the server issues tickets under TLS 1.3), then the store is
measured from outside:

- LMDB: the pages the environment's databases use (records and the expiry
  index: branch, leaf and overflow pages, times the page size), read through
  a read-only handle on the same file; the file itself is a sparse memory map
  sized for the bound, so its length says nothing.
- Redis: ``INFO memory``'s ``used_memory`` and ``DBSIZE``, before and after,
  over a plain socket (the keys, values, expiry entries and allocator overhead
  together).

Both give the growth divided by the number of records added, beside the
payload (key + sealed value) those records carry.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from bench import load, processes, servers

LMDB_DATABASES = (b"records", b"expiries", b"meta")
LMDB_CONFIG = "twistd-workers-1"  # the one-process server with an explicit --store lmdb:{dir}/sessions-{index}
REDIS_CONFIG = "twistd-sesscache-redis"


def lmdb_usage(path: Path) -> dict[str, int]:
    """Pages in use (all databases), records, and the bytes of their keys and values."""
    import lmdb  # type: ignore[import-untyped]

    env = lmdb.open(str(path), readonly=True, lock=True, max_dbs=4, subdir=True)
    try:
        with env.begin() as txn:
            pages = 0
            for name in LMDB_DATABASES:
                stat = txn.stat(env.open_db(name, txn=txn, create=False))
                pages += stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
            records = env.open_db(b"records", txn=txn, create=False)
            payload = entries = 0
            for key, value in txn.cursor(db=records):
                payload += len(key) + len(value)
                entries += 1
        return {"bytes": pages * env.stat()["psize"], "entries": entries, "payload": payload}
    finally:
        env.close()


def redis_command(port: int, *words: str) -> bytes:
    """One command to the Redis on ``port``, its reply's payload (bulk or integer), over a fresh socket."""
    request = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
    with socket.create_connection((load.HOST, port), timeout=5) as connection:
        connection.sendall(request.encode())
        reply = b""
        while True:
            chunk = connection.recv(65536)
            if not chunk:
                break
            reply += chunk
            if reply.startswith(b":") and reply.endswith(b"\r\n"):
                return reply[1:-2]
            if reply.startswith(b"$"):
                size, _, rest = reply[1:].partition(b"\r\n")
                if len(rest) >= int(size) + 2:
                    return rest[: int(size)]
            if reply.startswith(b"-"):
                raise ConnectionError(reply.decode(errors="replace").strip())
    raise ConnectionError(f"Redis on {port} closed without a whole reply")


def redis_usage(port: int) -> dict[str, int]:
    info = redis_command(port, "INFO", "memory").decode()
    used = next(int(line.split(":", 1)[1]) for line in info.splitlines() if line.startswith("used_memory:"))
    return {"bytes": used, "entries": int(redis_command(port, "DBSIZE"))}


def redis_payload(port: int, limit: int = 200) -> tuple[int, int]:
    """Key + value bytes of up to ``limit`` keys (a sample), and how many were read."""
    keys = redis_command(port, "RANDOMKEY")
    total = count = 0
    seen: set[bytes] = set()
    for _ in range(limit):
        if not keys or keys in seen:
            keys = redis_command(port, "RANDOMKEY")
            if keys in seen:
                continue
        seen.add(keys)
        total += len(keys) + int(redis_command(port, "STRLEN", keys.decode()))
        count += 1
        keys = b""
    return total, count


def measure(
    certificates: dict[str, tuple[Path, Path]],
    key: str,
    tls_versions: tuple[str, ...],
    connections: int,
    workdir: Path,
    unavailable: dict[str, str],
) -> list[dict[str, Any]]:
    """One row per store and TLS version: records added, bytes of store growth per record, payload per record."""
    certificate, private_key = certificates[key]
    rows: list[dict[str, Any]] = []
    for name, store in ((LMDB_CONFIG, "lmdb"), (REDIS_CONFIG, "redis")):
        config = servers.BY_NAME[name]
        why = unavailable.get(name) or config.unavailable()
        if why:
            rows.append({"store": store, "config": name, "unavailable": why})
            continue
        for tls in tls_versions:
            try:
                rows.append(_one(config, store, tls, connections, certificate, private_key, workdir / f"bytes-{tls}"))
            except (OSError, ConnectionError, processes.ServerFailed) as error:
                rows.append({"store": store, "config": name, "tls": tls, "unavailable": f"{type(error).__name__}: {error}"})
    return rows


def _one(config: servers.Config, store: str, tls: str, connections: int, certificate: Path, private_key: Path,
         workdir: Path) -> dict[str, Any]:  # fmt: skip
    with servers.running(config, certificate, private_key, workdir) as server:
        if store == "lmdb":
            assert server.workdir is not None
            usage = lambda: lmdb_usage(server.workdir / "sessions-0")  # noqa: E731
        else:
            port = server.helper_ports["redis"]
            usage = lambda: redis_usage(port)  # noqa: E731
        before = usage()
        outcome = load.run(load.Job(server.ports, tls, False, connections, 60.0), f"{store} TLS {tls} bytes", False)
        after = usage()
        if store == "lmdb":
            payload, sampled = after["payload"] - before["payload"], after["entries"] - before["entries"]
        else:
            payload, sampled = redis_payload(port)
    added = after["entries"] - before["entries"]
    return {
        "store": store,
        "config": config.name,
        "tls": tls,
        "connections": outcome.connections,
        "errors": outcome.errors,
        "records": added,
        "bytes_per_record": (after["bytes"] - before["bytes"]) / added if added > 0 else None,
        "payload_per_record": payload / sampled if sampled > 0 else None,
    }


def lmdb_costs(directory: Path, entries: int = 20480, count: int = 2000) -> dict[str, float] | None:
    """CPU µs per LMDB store call (bench/lmdb_cost.py), None when the store cannot be opened here."""
    try:
        from bench import lmdb_cost
        from twisted_sesscache.stores.lmdb import LMDBStore
    except ImportError:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    store = LMDBStore(directory / "store", entries)
    try:
        return lmdb_cost.measure(store, entries, count)
    finally:
        store.close()

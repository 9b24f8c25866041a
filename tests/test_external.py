"""Sessions shared through a store: several listeners, each with its own cache, as processes would be."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet.defer import Deferred

from tests.hello_peers import CountingStore
from tests.support import RedisProcess, ReactorThread, TLSFiles, s_client, tls_server
from twisted_sesscache import SessionCache
from twisted_sesscache.certs import certificate_options
from twisted_sesscache.sealing import Sealer
from twisted_sesscache.server.tickets import SharedTicketKeys
from twisted_sesscache.stores.sealed import record_context
from twisted_sesscache.interfaces import ISessionStore
from twisted_sesscache.stores import store_from_url
from twisted_sesscache.stores.memory import MemoryStore

pytestmark = pytest.mark.shared_only(
    "the server-side external store uses OpenSSL's session callbacks, which PyPI wheels do not expose"
)

KEY = bytes(range(32))


@contextmanager
def fleet(
    rt: ReactorThread, files: TLSFiles, store: ISessionStore, count: int = 3, *, started: bool = False, **kwargs: Any
) -> Iterator[tuple[list[int], list[SessionCache]]]:
    """``count`` listeners sharing one store, as ``count`` processes would.

    The store timeout is generous unless a test sets it, so that a loaded
    machine measures sharing rather than Redis latency. ``started``: each
    cache started (shared ticket keys fetched) and stopped at the end.
    """
    kwargs.setdefault("store_timeout", 2.0)
    caches = [SessionCache(store=store, store_keys=[KEY], **kwargs) for _ in range(count)]
    with ExitStack() as stack:
        ports = [
            stack.enter_context(
                tls_server(rt, cache.server_context_factory(certificate_options(files.certificate, files.private_key)))
            )
            for cache in caches
        ]
        if started:
            for cache in caches:
                rt.call(cache.start)
                stack.callback(rt.call, cache.stop)
        yield ports, caches


def ticket_keys(cache: SessionCache) -> SharedTicketKeys:
    """The ticket keys of a cache made with ``tickets="shared"``."""
    keys = cache.ticket_keys
    assert keys is not None
    return keys


def redis_store(rt: ReactorThread, redis: RedisProcess) -> ISessionStore:
    store = rt.call(store_from_url, redis.url)
    return store


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_session_made_on_one_listener_resumes_on_the_others(
    reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path, redis: RedisProcess, tls: str, kind: str
) -> None:
    store = MemoryStore() if kind == "memory" else redis_store(reactor_thread, redis)
    session = tmp_path / "s.pem"
    with fleet(reactor_thread, tls_files, store) as (ports, caches):
        assert s_client(ports[0], tls=tls, sess_out=session) == "New"
        time.sleep(0.05)  # the write to the store is asynchronous
        assert s_client(ports[1], tls=tls, sess_in=session, sess_out=session) == "Reused"
        time.sleep(0.05)
        assert s_client(ports[2], tls=tls, sess_in=session) == "Reused"
        stats = [reactor_thread.call(cache.stats) for cache in caches]
    assert stats[1]["store_hits"] >= 1 and stats[2]["store_hits"] >= 1
    assert all(s["store_errors"] == 0 and s["store_rejected"] == 0 for s in stats)
    if kind == "redis":
        reactor_thread.call(store.close)


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
@pytest.mark.parametrize("kind", ["memory", "lmdb"])
def test_a_store_that_answers_at_once_is_asked_only_for_what_openssl_lacks(
    reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path, tls: str, kind: str
) -> None:
    """No hello is read for it: OpenSSL's callback asks it, and only for sessions its own cache misses."""
    store = MemoryStore() if kind == "memory" else store_from_url(f"lmdb:{tmp_path / 'lmdb'}")
    session = tmp_path / "s.pem"
    with fleet(reactor_thread, tls_files, store, count=2) as (ports, caches):
        assert s_client(ports[0], tls=tls, sess_out=session) == "New"
        assert s_client(ports[0], tls=tls, sess_in=session) == "Reused"  # from OpenSSL's own cache
        local = reactor_thread.call(caches[0].stats)
        assert s_client(ports[1], tls=tls, sess_in=session) == "Reused"  # from the store, in the callback
        other = reactor_thread.call(caches[1].stats)
        watched = reactor_thread.call(lambda: caches[0].watch(SSL.Connection(caches[0].contexts[0], None)))
    assert local["store_hits"] == local["store_misses"] == 0
    assert other["store_hits"] == 1 and other["store_misses"] == 0
    assert watched.hello is None and watched._held is None  # the bytes go straight to OpenSSL
    reactor_thread.call(store.close)


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_a_store_that_answers_later_is_not_asked_for_what_openssl_holds(
    reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path, tls: str
) -> None:
    """The prefetch skips the sessions OpenSSL's own cache holds, and only those: one flushed is fetched again."""
    store = CountingStore()
    session = tmp_path / "s.pem"
    with fleet(reactor_thread, tls_files, store, count=2) as (ports, caches):
        assert s_client(ports[0], tls=tls, sess_out=session) == "New"
        gets = store.gets
        assert s_client(ports[0], tls=tls, sess_in=session) == "Reused"  # OpenSSL's own cache: no fetch
        assert store.gets == gets
        assert s_client(ports[1], tls=tls, sess_in=session) == "Reused"  # fetched from the store
        assert store.gets == gets + 1
        if tls == "1.2":  # OpenSSL added the fetched session to its own cache: not fetched twice
            assert s_client(ports[1], tls=tls, sess_in=session) == "Reused"
            assert store.gets == gets + 1
        assert reactor_thread.call(caches[0].flush, time.time() + 10**6) >= 1  # gone, from the store too
        gets = store.gets
        assert s_client(ports[0], tls=tls, sess_in=session) == "New"
        assert store.gets == gets + 1  # no longer held, so looked up


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_with_tickets_the_store_is_neither_asked_nor_written(
    reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path, tls: str
) -> None:
    """Sessions travel in their tickets: no hello is read, nothing fetched, nothing but ticket keys written."""
    store = CountingStore()
    session = tmp_path / "s.pem"
    with fleet(reactor_thread, tls_files, store, count=2, tickets="shared", started=True) as (ports, caches):
        assert s_client(ports[0], tls=tls, sess_out=session) == "New"
        gets = store.gets
        assert s_client(ports[1], tls=tls, sess_in=session) == "Reused"  # the other listener opens the ticket
        time.sleep(0.05)
        assert store.gets == gets
        assert sum(reactor_thread.call(cache.stats)["store_writes"] for cache in caches) == 0
        assert store._entries and all(key.startswith(b"ticket-key:") for key in store._entries)
        watched = reactor_thread.call(lambda: caches[1].watch(SSL.Connection(caches[1].contexts[0], None)))
        assert watched._held is None  # the bytes go straight to OpenSSL


def test_with_tickets_a_tls12_client_that_takes_none_resumes_where_it_began(
    reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """The store (one that answers later) is not asked for sessions: such a client resumes on its first listener only."""
    store = CountingStore()
    session = tmp_path / "s.pem"
    no_ticket = ("-no_ticket",)
    with fleet(reactor_thread, tls_files, store, count=2, tickets="shared", started=True) as (ports, _):
        gets = store.gets  # the ticket keys'
        assert s_client(ports[0], sess_out=session, extra=no_ticket) == "New"
        assert s_client(ports[0], sess_in=session, extra=no_ticket) == "Reused"  # OpenSSL's own cache
        assert s_client(ports[1], sess_in=session, extra=no_ticket) == "New"
        assert store.gets == gets


def test_a_session_evicted_from_a_full_cache_is_fetched_again(
    reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """OpenSSL's remove callback reports eviction too: the ID no longer counts as held."""
    store = CountingStore()
    first, second = tmp_path / "first.pem", tmp_path / "second.pem"
    with fleet(reactor_thread, tls_files, store, count=1, size=1) as (ports, _):
        assert s_client(ports[0], sess_out=first) == "New"
        assert s_client(ports[0], sess_out=second) == "New"  # the cache holds one: the first is evicted
        gets = store.gets
        assert s_client(ports[0], sess_in=second) == "Reused"
        assert store.gets == gets
        assert s_client(ports[0], sess_in=first) == "New"  # evicted, and deleted from the store with it
        assert store.gets == gets + 1


def test_records_in_redis_are_sealed(
    reactor_thread: ReactorThread, tls_files: TLSFiles, redis: RedisProcess
) -> None:
    store = redis_store(reactor_thread, redis)
    with fleet(reactor_thread, tls_files, store, count=1) as (ports, _):
        s_client(ports[0])
        time.sleep(0.1)
    keys = redis.command("KEYS", "sesscache:*")
    assert "sesscache:" in keys
    key = keys.split("\r\n")[2]
    value = redis.command("GET", key).split("\r\n", 1)[1]
    # A DER session starts with a SEQUENCE (0x30); a sealed record with its version byte.
    assert value.encode("latin-1")[:1] == b"\x01"
    ttl = int(redis.command("TTL", key).strip(":\r\n"))
    assert 0 < ttl <= 300
    reactor_thread.call(store.close)


@pytest.mark.parametrize("keyed", [False, True])
def test_an_in_process_store_seals_only_when_given_a_key(
    reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path, keyed: bool
) -> None:
    """Nobody but this process reads a MemoryStore: without a key its sessions are kept as OpenSSL encodes them."""
    store = MemoryStore()
    caches = [SessionCache(store=store, store_keys=[KEY] if keyed else None) for _ in range(2)]
    session = tmp_path / "s.pem"
    with ExitStack() as stack:
        ports = [
            stack.enter_context(tls_server(
                reactor_thread, cache.server_context_factory(certificate_options(tls_files.certificate, tls_files.private_key))
            ))
            for cache in caches
        ]
        assert s_client(ports[0], sess_out=session) == "New"
        time.sleep(0.05)
        ((_, (_, record)),) = store._entries.items()
        # A DER session starts with a SEQUENCE (0x30); a sealed record with its version byte.
        assert record[:1] == (b"\x01" if keyed else b"\x30")
        # The other listener has it only in the store, and resumes it from there.
        assert s_client(ports[1], sess_in=session) == "Reused"
        stats = reactor_thread.call(caches[1].stats)
        assert stats["store_hits"] == 1 and stats["store_rejected"] == 0
        assert (stats["store_key_fingerprint"] is not None) is keyed


@pytest.mark.parametrize("corruption", ["other-key", "truncated", "random", "other-context", "moved", "undecodable"])
def test_bad_records_never_resume_and_never_crash(
    reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path, corruption: str
) -> None:
    store = MemoryStore()
    session = tmp_path / "s.pem"
    with fleet(reactor_thread, tls_files, store, count=2) as (ports, caches):
        assert s_client(ports[0], sess_out=session) == "New"
        time.sleep(0.05)
        ((key, (expires, record)),) = store._entries.items()
        sid_context = caches[0].server.session_id_context(caches[0].contexts[0])
        if corruption == "other-key":
            record = Sealer([os.urandom(32)]).seal(b"anything", kind=b"session", context=b"x")
        elif corruption == "truncated":
            record = record[: len(record) // 2]
        elif corruption == "random":
            record = os.urandom(len(record))
        elif corruption in ("other-context", "moved"):
            der = Sealer([KEY]).open(record, kind=b"session", context=record_context(key, sid_context))
            if corruption == "moved":  # another key's record (last byte differs), copied here (redis-cli COPY ... REPLACE)
                elsewhere = key[:-1] + bytes([key[-1] ^ 1])
                record = Sealer([KEY]).seal(der, kind=b"session", context=record_context(elsewhere, sid_context))
            else:
                record = Sealer([KEY]).seal(der, kind=b"session", context=record_context(key, b"another listener"))
        else:  # sealed correctly, but not a session OpenSSL accepts
            record = Sealer([KEY]).seal(b"\x30\x03not a session", kind=b"session",
                                        context=record_context(key, sid_context))
        store._entries[key] = (expires, record)
        assert s_client(ports[1], sess_in=session) == "New"
        assert s_client(ports[1]) == "New"  # and the listener goes on serving
        stats = reactor_thread.call(caches[1].stats)
        assert stats["store_rejected"] == 1
        assert stats["store_foreign_key"] == (1 if corruption == "other-key" else 0)


class SilentStore(MemoryStore):
    """A store whose reads never answer: a Redis that hangs."""

    answers_at_once = False  # it never answers, let alone at once: the hello is read and prefetched

    def get(self, key: bytes, timeout: float | None = None) -> Deferred[bytes | None]:
        return Deferred()


def test_a_store_that_does_not_answer_costs_one_timeout(
    reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path
) -> None:
    session = tmp_path / "s.pem"
    with fleet(reactor_thread, tls_files, SilentStore(), count=2, store_timeout=0.05) as (ports, caches):
        assert s_client(ports[0], sess_out=session) == "New"
        started = time.monotonic()
        assert s_client(ports[1], sess_in=session) == "New"
        assert time.monotonic() - started < 5
        assert reactor_thread.call(caches[1].stats)["store_timeouts"] == 1


@pytest.mark.slow
def test_redis_outage_costs_resumption_not_connections(
    reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path, redis: RedisProcess
) -> None:
    store = redis_store(reactor_thread, redis)
    session = tmp_path / "s.pem"
    with fleet(reactor_thread, tls_files, store, count=2, store_timeout=0.05) as (ports, caches):
        assert s_client(ports[0], sess_out=session) == "New"
        redis.stop()
        outcomes = [s_client(ports[i % 2], sess_in=session if i % 2 else None) for i in range(200)]
        assert len(outcomes) == 200  # every connection completed its handshake
        assert reactor_thread.call(caches[1].stats)["store_errors"] + reactor_thread.call(caches[1].stats)["store_timeouts"] > 0
        redis.start()  # same port: the store reconnects by itself
        deadline = time.monotonic() + 30
        resumed = False
        while not resumed and time.monotonic() < deadline:
            s_client(ports[0], sess_out=session)
            time.sleep(0.2)
            resumed = s_client(ports[1], sess_in=session) == "Reused"
        assert resumed, "resumption did not come back after Redis returned"
    reactor_thread.call(store.close)


def test_malformed_client_hello_gets_an_error_and_the_listener_serves_on(
    reactor_thread: ReactorThread, tls_files: TLSFiles
) -> None:
    with fleet(reactor_thread, tls_files, MemoryStore(), count=1) as (ports, _):
        for garbage in (b"\x16\x03\x01\x00\x05\x01\x00\x00\xff\xff", b"GET / HTTP/1.0\r\n\r\n", os.urandom(300)):
            with socket.create_connection(("127.0.0.1", ports[0]), timeout=5) as conn:
                conn.sendall(garbage)
                conn.shutdown(socket.SHUT_WR)
                conn.settimeout(5)
                try:
                    while conn.recv(4096):
                        pass
                except (ConnectionResetError, TimeoutError):
                    pass
        assert s_client(ports[0]) == "New"


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_shared_ticket_keys_resume_stateless_tickets_anywhere(
    reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path, redis: RedisProcess, tls: str
) -> None:
    store = redis_store(reactor_thread, redis)
    session = tmp_path / "s.pem"
    with fleet(reactor_thread, tls_files, store, tickets="shared", ticket_key_rotation=3600, started=True) as (
        ports,
        caches,
    ):
        assert s_client(ports[0], tls=tls, sess_out=session) == "New"
        assert s_client(ports[1], tls=tls, sess_in=session) == "Reused"
        assert s_client(ports[2], tls=tls, sess_in=session) == "Reused"
        stats = [reactor_thread.call(cache.stats) for cache in caches]
        # Stateless: the store holds ticket keys, not sessions, and nobody looked one up.
        assert sum(s["store_hits"] for s in stats) == 0
        assert sum(ticket_keys(c).created for c in caches) == 2  # this epoch's key and the next one's
    reactor_thread.call(store.close)


def test_shared_tls13_tickets_are_renewed_for_clients_that_use_each_once(
    reactor_thread: ReactorThread, tls_files: TLSFiles
) -> None:
    """The project's own client offers each TLS 1.3 ticket once: every resumption must bring a new one."""
    from tests.test_client import series, trusting

    store = MemoryStore()
    client = SessionCache("client")
    with fleet(reactor_thread, tls_files, store, count=1, tickets="shared") as (ports, caches):
        reactor_thread.call(caches[0].start)
        try:
            creator = client.client_creator("localhost", trust_root=trusting(tls_files))
            resumed = series(reactor_thread, creator, ports[0], count=8)
        finally:
            reactor_thread.call(caches[0].stop)
    assert resumed == [False] + [True] * 7, resumed


def test_tickets_from_before_a_rotation_still_resume(
    reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path
) -> None:
    store = MemoryStore()
    session = tmp_path / "s.pem"
    rotation = 1.0
    with fleet(
        reactor_thread, tls_files, store, count=2, tickets="shared", ticket_key_rotation=rotation, timeout=30, started=True
    ) as (ports, caches):
        assert s_client(ports[0], sess_out=session) == "New"
        issued = ticket_keys(caches[0]).current()
        time.sleep(2.2 * rotation)  # two rotations later
        for cache in caches:
            reactor_thread.call(ticket_keys(cache).refresh)
        assert ticket_keys(caches[1]).current() != issued
        assert s_client(ports[1], sess_in=session) == "Reused"


def test_new_tls13_clients_cost_the_store_no_lookup(
    reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path
) -> None:
    """A TLS 1.3 hello's legacy session ID is random: looking it up would be one wasted query per client."""
    with fleet(reactor_thread, tls_files, MemoryStore(), count=1) as (ports, caches):
        for _ in range(3):
            assert s_client(ports[0], tls="1.3") == "New"
        stats = reactor_thread.call(caches[0].stats)
    assert stats["store_misses"] == 0 and stats["store_hits"] == 0

"""Client sessions shared through a store: a second process (proxy) resumes the first one's upstream sessions."""

from __future__ import annotations

import pytest

from tests.support import RedisProcess, ReactorThread, TLSFiles, s_server
from tests.test_client import series
from twisted_sesscache.cache import SessionCache
from twisted_sesscache.stores import store_from_url
from twisted_sesscache.stores.memory import MemoryStore

KEY = bytes(range(32))


def client(rt: ReactorThread, store: object, files: TLSFiles) -> tuple[SessionCache, object]:
    """One 'process': its own cache (empty locally), the shared store and key.

    The store timeout is generous so that a loaded test machine measures
    sharing, not Redis latency (the timeout path has its own test).
    """
    cache = SessionCache("client", store=store, store_keys=[KEY], store_timeout=2.0)  # type: ignore[arg-type]
    return cache, cache.client_creator("localhost", trust_root=str(files.certificate))


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_fresh_process_resumes_from_the_store(
    reactor_thread: ReactorThread, tls_files: TLSFiles, redis: RedisProcess, tls: str, kind: str
) -> None:
    store = MemoryStore() if kind == "memory" else reactor_thread.call(store_from_url, redis.url)
    reactor_thread.call(store.get, b"warm-up")  # a long-running process has its connection already
    with s_server(tls_files, tls) as port:
        first, first_creator = client(reactor_thread, store, tls_files)
        assert series(reactor_thread, first_creator, port, count=2) == [False, True]
        second, second_creator = client(reactor_thread, store, tls_files)
        assert series(reactor_thread, second_creator, port, count=3) == [True, True, True]
    stats = reactor_thread.call(second.stats)["client"]
    assert stats["store_hits"] >= 1 and stats["hits"] == 3
    if kind == "redis":
        reactor_thread.call(store.close)  # type: ignore[attr-defined]


def test_tls13_tickets_from_the_store_are_single_use(reactor_thread: ReactorThread, tls_files: TLSFiles) -> None:
    store = MemoryStore()
    with s_server(tls_files, "1.3", "-num_tickets", "1") as port:
        _, first_creator = client(reactor_thread, store, tls_files)
        series(reactor_thread, first_creator, port, count=1)
        (published,) = [record for _, record in store._entries.values()]
        second, second_creator = client(reactor_thread, store, tls_files)
        assert series(reactor_thread, second_creator, port, count=1) == [True]
        # The first process's ticket left the store when taken; only the second's new one is there.
        assert published not in [record for _, record in store._entries.values()]
    assert reactor_thread.call(second.stats)["client"]["store_hits"] == 1


def test_a_store_that_does_not_answer_costs_one_full_handshake(
    reactor_thread: ReactorThread, tls_files: TLSFiles
) -> None:
    from tests.test_external import SilentStore  # noqa: PLC0415

    cache = SessionCache("client", store=SilentStore(), store_keys=[KEY], store_timeout=0.05)
    creator = cache.client_creator("localhost", trust_root=str(tls_files.certificate))
    with s_server(tls_files, "1.2") as port:
        assert series(reactor_thread, creator, port, count=2) == [False, True]
    assert reactor_thread.call(cache.stats)["client"]["store_timeouts"] == 1


def test_records_sealed_for_another_key_are_rejected(reactor_thread: ReactorThread, tls_files: TLSFiles) -> None:
    store = MemoryStore()
    with s_server(tls_files, "1.2") as port:
        _, first_creator = client(reactor_thread, store, tls_files)
        series(reactor_thread, first_creator, port, count=1)
        other = SessionCache("client", store=store, store_keys=[bytes(32)])
        creator = other.client_creator("localhost", trust_root=str(tls_files.certificate))
        assert series(reactor_thread, creator, port, count=1) == [False]
    assert reactor_thread.call(other.stats)["client"]["store_rejected"] == 1

"""Client sessions shared through a store: a second process (proxy) resumes the first one's upstream sessions."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, gatherResults

from tests.support import RedisProcess, ReactorThread, TLSFiles, s_server
from tests.test_client import Fetch, fetch, series
from twisted_sesscache.cache import SessionCache
from twisted_sesscache.interfaces import ISessionStore
from twisted_sesscache.stores import store_from_url
from twisted_sesscache.stores.memory import MemoryStore

KEY = bytes(range(32))


def client(rt: ReactorThread, store: ISessionStore, files: TLSFiles) -> tuple[SessionCache, object]:
    """One 'process': its own cache (empty locally), the shared store and key.

    The store timeout is generous so that a loaded test machine measures
    sharing, not Redis latency (the timeout path has its own test).
    """
    cache = SessionCache("client", store=store, store_keys=[KEY], store_timeout=2.0)
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
        reactor_thread.call(store.close)


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

    class Silent(SilentStore):
        """Tickets are taken, not read: the hanging store does not answer ``take`` either."""

        def take(self, key: bytes, timeout: float | None = None) -> Deferred[bytes | None]:
            return Deferred()

    cache = SessionCache("client", store=Silent(), store_keys=[KEY], store_timeout=0.05)
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


def shared_store(rt: ReactorThread, kind: str, redis: RedisProcess) -> ISessionStore:
    store = MemoryStore() if kind == "memory" else rt.call(store_from_url, redis.url)
    rt.call(store.get, b"warm-up")
    return store


def close(rt: ReactorThread, store: ISessionStore) -> None:
    rt.call(store.close)


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_two_processes_racing_for_one_ticket_only_one_gets_it(
    reactor_thread: ReactorThread, tls_files: TLSFiles, redis: RedisProcess, kind: str
) -> None:
    """Both ask the store in the same reactor turn, before either answer is back: one ticket, one taker."""
    store = shared_store(reactor_thread, kind, redis)
    with s_server(tls_files, "1.3", "-num_tickets", "1") as port:
        first, first_creator = client(reactor_thread, store, tls_files)
        series(reactor_thread, first_creator, port, count=1)
        (key,) = first.client.sessions._keys  # the one key the ticket was published under
        racers = [client(reactor_thread, store, tls_files)[0] for _ in range(2)]

        def race() -> Deferred[list[tuple[bytes, bool] | None]]:
            return gatherResults([racer.client.shared.fetch(key) for racer in racers])  # type: ignore[union-attr]

        answers = reactor_thread.call(race)
    got = [answer for answer in answers if answer is not None]
    assert len(got) == 1, answers
    assert got[0][1] is True  # it was the TLS 1.3 ticket
    hits = [reactor_thread.call(racer.stats)["client"]["store_hits"] for racer in racers]
    assert sorted(hits) == [0, 1]
    close(reactor_thread, store)


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_two_processes_connecting_at_once_offer_one_ticket_once(
    reactor_thread: ReactorThread, tls_files: TLSFiles, redis: RedisProcess, kind: str
) -> None:
    """End to end: two fresh processes connect at the same moment; the first process's one ticket
    is offered by exactly one of them, and that one resumes."""
    store = shared_store(reactor_thread, kind, redis)
    with s_server(tls_files, "1.3", "-num_tickets", "1") as port:
        _, first_creator = client(reactor_thread, store, tls_files)
        series(reactor_thread, first_creator, port, count=1)
        racers = [client(reactor_thread, store, tls_files) for _ in range(2)]

        def race() -> Deferred[list[Fetch]]:
            return gatherResults([fetch(creator, port) for _, creator in racers])

        results = reactor_thread.call(race)
    stats = [reactor_thread.call(cache.stats)["client"] for cache, _ in racers]
    assert sorted(s["offered"] for s in stats) == [0, 1], stats
    assert sorted(s["store_hits"] for s in stats) == [0, 1], stats
    assert sorted(r.resumed for r in results) == [False, True]
    assert all(r.resumed == r.server_says_resumed for r in results)
    close(reactor_thread, store)


def test_tls12_sessions_are_read_and_tls13_tickets_taken(reactor_thread: ReactorThread, tls_files: TLSFiles) -> None:
    """The record's kind is in its name, so a ticket is taken without a session being read first."""
    store = MemoryStore()
    for tls, suffix, stays in (("1.2", b":tls1.2", True), ("1.3", b":tls1.3", False)):
        with s_server(tls_files, tls, "-num_tickets", "1") as port:
            before = set(store._entries)
            _, creator = client(reactor_thread, store, tls_files)
            series(reactor_thread, creator, port, count=1)
            (name,) = set(store._entries) - before
            assert name.endswith(suffix)
            published = store._entries[name][1]
            second, second_creator = client(reactor_thread, store, tls_files)
            assert series(reactor_thread, second_creator, port, count=1) == [True]
            # A TLS 1.2 session is offered again and stays; a ticket left when it was taken.
            assert (store._entries.get(name, (0, b""))[1] == published) is stays
        assert reactor_thread.call(second.stats)["client"]["store_hits"] == 1

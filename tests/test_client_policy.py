"""The client cache's rules on a fake clock: lifetimes, single use, bounds, the store's deadline.

The real-handshake tests (test_client.py, test_client_store.py) show these
rules hold against real servers; these pin each rule alone, in milliseconds.
"""

from __future__ import annotations

import ast
import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from twisted_sesscache import RUNTIME
from twisted_sesscache.client.cache import ClientSessionCache
from twisted_sesscache.client.contexts import _states, state_of
from twisted_sesscache.client.creator import SessionClientCreator
from twisted_sesscache.client.key import SessionKey
from twisted_sesscache.client.policy import SessionHTTPSPolicy
from twisted_sesscache.client.shared import SharedClientSessions
from twisted_sesscache.sealing import Sealer
from twisted_sesscache.stores.memory import MemoryStore

NOW = 1_800_000_000  # wall-clock seconds: a session's own expiry is stamped in them
KEY = SessionKey("example.test", "example.test", 443, (), "settings")
OTHER = SessionKey("other.test", "other.test", 443, (), "settings")


def _der(tag: int, value: bytes) -> bytes:
    assert len(value) < 128
    return bytes((tag, len(value))) + value


def _integer(value: int) -> bytes:
    return _der(0x02, value.to_bytes(8, "big", signed=True))


def session_der(created: int, lifetime: int, session_id: bytes = b"id", marker: bytes = b"") -> bytes:
    """A minimal ``i2d_SSL_SESSION`` encoding: what ``session_facts`` reads (ssl/ssl_asn1.c order)."""
    body = (
        _der(0x02, b"\x01")  # encoding version
        + _der(0x02, b"\x03\x04")  # protocol version
        + _der(0x04, b"\x13\x01")  # cipher
        + _der(0x04, session_id)
        + _der(0x04, b"master" + marker)
        + _der(0xA1, _integer(created))
        + _der(0xA2, _integer(lifetime))
    )
    return _der(0x30, body)


def clock_at(now: float = NOW) -> Clock:
    clock = Clock()
    clock.advance(now)
    return clock


def cache_on(clock: Clock, **options: Any) -> ClientSessionCache:
    return ClientSessionCache(clock=clock, **options)


# -- lifetime ----------------------------------------------------------------------------


def test_lifetime_capped_by_timeout() -> None:
    clock = clock_at()
    cache = cache_on(clock, timeout=5)
    der = session_der(NOW, 7200)
    assert cache.remember_der(KEY, der, tls13=False) == der
    clock.advance(4.9)
    assert cache.take(KEY) == der
    clock.advance(0.1)
    assert cache.take(KEY) is None
    assert cache.stats()["expired"] == 1


def test_own_lifetime_when_shorter_than_timeout() -> None:
    clock = clock_at()
    cache = cache_on(clock, timeout=300)
    cache.remember_der(KEY, session_der(NOW, 2), tls13=False)
    clock.advance(1)
    assert cache.take(KEY) is not None
    clock.advance(1)
    assert cache.take(KEY) is None


def test_expired_or_unresumable_sessions_are_not_kept() -> None:
    cache = cache_on(clock_at())
    assert cache.remember_der(KEY, session_der(NOW - 100, 10), tls13=False) is None
    assert cache.remember_der(KEY, session_der(NOW, 100, session_id=b""), tls13=False) is None
    assert cache.stats()["number"] == 0


def test_flush_removes_what_expired_by_the_cache_clock() -> None:
    clock = clock_at()
    cache = cache_on(clock, timeout=10)
    cache.remember_der(KEY, session_der(NOW, 5), tls13=False)
    cache.remember_der(OTHER, session_der(NOW, 60), tls13=False)
    assert cache.flush() == 0
    clock.advance(5)
    assert cache.flush() == 1
    clock.advance(5)
    assert cache.flush() == 1 and cache.stats()["number"] == 0


# -- single use, replacement, bounds ------------------------------------------------------------


def test_tls13_tickets_are_single_use_and_tls12_sessions_are_not() -> None:
    cache = cache_on(clock_at())
    first, second = session_der(NOW, 60, marker=b"1"), session_der(NOW, 60, marker=b"2")
    cache.remember_der(KEY, first, tls13=True)
    cache.remember_der(KEY, second, tls13=True)
    assert [cache.take(KEY), cache.take(KEY), cache.take(KEY)] == [second, first, None]
    cache.remember_der(OTHER, first, tls13=False)
    assert [cache.take(OTHER) for _ in range(3)] == [first] * 3


def test_a_newer_tls12_session_replaces_the_older() -> None:
    cache = cache_on(clock_at())
    older, newer = session_der(NOW, 60, marker=b"old"), session_der(NOW, 60, marker=b"new")
    cache.remember_der(KEY, older, tls13=False)
    cache.remember_der(KEY, newer, tls13=False)
    assert cache.stats()["number"] == 1 and cache.take(KEY) == newer


def test_least_recently_used_key_goes_first() -> None:
    cache = cache_on(clock_at(), size=2, per_key=1)
    keys = [SessionKey(f"h{n}.test", None, 443, (), "s") for n in range(3)]
    ders = [session_der(NOW, 60, marker=bytes([n])) for n in range(3)]
    cache.remember_der(keys[0], ders[0], tls13=False)
    cache.remember_der(keys[1], ders[1], tls13=False)
    assert cache.take(keys[0]) == ders[0]  # keys[0] is now the most recently used
    cache.remember_der(keys[2], ders[2], tls13=False)
    assert [cache.take(k) for k in keys] == [ders[0], None, ders[2]]
    assert cache.stats()["evicted"] == 1 and cache.stats()["size_limit"] == 2


def test_forgotten_sessions_are_counted_as_invalidated() -> None:
    cache = cache_on(clock_at())
    der = session_der(NOW, 60)
    cache.remember_der(KEY, der, tls13=False)
    assert cache.forget(KEY, [der]) == 1
    assert cache.take(KEY) is None and cache.stats()["invalidated"] == 1


# -- the store ------------------------------------------------------------------------------------


def shared_on(clock: Clock, store: MemoryStore, timeout: float = 0.05) -> SharedClientSessions:
    return SharedClientSessions(store, Sealer([bytes(32)]), timeout=timeout, clock=clock)


def results(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_store_records_live_as_long_as_the_session() -> None:
    clock = clock_at()
    store = MemoryStore(clock=clock.seconds)
    cache = cache_on(clock, timeout=30, shared=shared_on(clock, store))
    der = session_der(NOW, 7200)
    cache.remember_der(KEY, der, tls13=False)
    reader = shared_on(clock, store)
    assert results(reader.fetch(KEY)) == [(der, False)]
    assert results(reader.fetch(KEY)) == [(der, False)]  # a TLS 1.2 session is read, not taken
    clock.advance(30)
    assert results(reader.fetch(KEY)) == [None]
    assert reader.counts["store_hits"] == 2 and reader.counts["store_misses"] == 1


def test_store_tickets_are_taken_before_sessions_are_read() -> None:
    clock = clock_at()
    store = MemoryStore(clock=clock.seconds)
    writer = shared_on(clock, store)
    ticket, session = session_der(NOW, 60, marker=b"13"), session_der(NOW, 60, marker=b"12")
    writer.publish(KEY, session, tls13=False, ttl=60)
    writer.publish(KEY, ticket, tls13=True, ttl=60)
    reader = shared_on(clock, store)
    assert results(reader.fetch(KEY)) == [(ticket, True)]
    assert results(reader.fetch(KEY)) == [(session, False)]
    assert results(reader.fetch(KEY)) == [(session, False)]
    assert reader.counts["store_hits"] == 3


class Hanging(MemoryStore):
    """A store that never answers a read: a stalled Redis."""

    answers_at_once = False

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Deferred[bytes | None]] = []

    def get(self, key: bytes, timeout: float | None = None) -> Deferred[bytes | None]:
        self.waiting.append(Deferred())
        return self.waiting[-1]

    take = get


def test_a_hanging_store_costs_one_deadline_and_one_timeout() -> None:
    clock = clock_at()
    store = Hanging()
    shared = shared_on(clock, store, timeout=0.05)
    answer = results(shared.fetch(KEY))
    clock.advance(0.049)
    assert answer == []
    clock.advance(0.001)
    assert answer == [None]
    assert shared.counts["store_timeouts"] == 1 and shared.counts["store_misses"] == 0
    assert len(store.waiting) == 1  # the session read never started: the ticket's take used the time


def test_a_late_ticket_answer_then_a_hanging_session_read_shares_the_deadline() -> None:
    clock = clock_at()
    store = Hanging()
    shared = shared_on(clock, store, timeout=0.05)
    answer = results(shared.fetch(KEY))
    clock.advance(0.03)
    store.waiting[0].callback(None)  # no ticket, after 30 ms; the session read hangs
    clock.advance(0.02)
    assert answer == [None] and shared.counts["store_timeouts"] == 1
    assert store.waiting[1].called  # cancelled with the lookup


def test_a_ticket_moved_into_the_sessions_place_does_not_open() -> None:
    """Records are sealed under their store name: a ticket copied to the TLS 1.2 slot would be offered again."""
    clock = clock_at()
    store = MemoryStore(clock=clock.seconds)
    shared = shared_on(clock, store)
    shared.publish(KEY, session_der(NOW, 60), tls13=True, ttl=60)
    base, _ = shared.store_key(KEY)
    ticket = store.take(base + b":tls1.3").result
    assert isinstance(ticket, bytes)
    store.set(base + b":tls1.2", ticket, 60)
    assert results(shared.fetch(KEY)) == [None]
    assert shared.counts["store_rejected"] == 1 and shared.counts["store_hits"] == 0


def test_stats_include_the_store_counters() -> None:
    clock = clock_at()
    cache = cache_on(clock, shared=shared_on(clock, MemoryStore(clock=clock.seconds)))
    cache.remember_der(KEY, session_der(NOW, 60), tls13=True)
    stats = cache.stats()
    assert stats["store_writes"] == 1 and stats["number"] == 1


# -- contexts -------------------------------------------------------------------------------------


def test_context_state_is_kept_beside_the_context() -> None:
    cache = ClientSessionCache(timeout=42)
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    assert cache.prepare_context(context) is True
    assert not [name for name in vars(context) if "sesscache" in name]
    state = state_of(context)
    assert state is not None and state.prepared and state.callbacks == RUNTIME.shared
    assert context.get_timeout() == 42
    # Prepared once: a second cache does not change it.
    assert ClientSessionCache(timeout=7).prepare_context(context) is True
    assert context.get_timeout() == 42
    # The registry does not keep the context alive, and its entry goes with it.
    gone = weakref.ref(context)
    before = len(_states)
    del context, state
    gc.collect()
    assert gone() is None and len(_states) < before


def test_a_context_that_made_a_connection_first() -> None:
    cache = ClientSessionCache()
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    SSL.Connection(context, None)
    prepared = cache.prepare_context(context)
    state = state_of(context)
    assert state is not None and state.prepared is prepared
    # pyOpenSSL 25+ (the bundled runtime) freezes a context once it has made a connection.
    frozen = not RUNTIME.shared
    assert prepared is not frozen
    assert cache.prepare_context(context) is prepared  # asked again: the same answer, no second warning


# -- the Agent policy ------------------------------------------------------------------------------


class Recorder:
    """A CreatorSource that counts the creators it makes."""

    def __init__(self) -> None:
        self.made: list[tuple[str, int | None]] = []

    def creator(self, hostname: str, *, port: int | None = None, **options: Any) -> SessionClientCreator:
        self.made.append((hostname, port))
        return object()  # type: ignore[return-value]


def test_https_policy_keeps_one_creator_per_netloc_most_recent_first() -> None:
    source = Recorder()
    policy = SessionHTTPSPolicy(source, creators=2)
    a = policy.creatorForNetloc(b"a.test", 443)
    assert policy.creatorForNetloc("a.test", 443) is a
    policy.creatorForNetloc(b"b.test", 443)
    policy.creatorForNetloc(b"a.test", 443)  # a is now the most recent
    policy.creatorForNetloc(b"c.test", 443)  # b goes
    policy.creatorForNetloc(b"a.test", 443)
    policy.creatorForNetloc(b"b.test", 443)
    assert source.made == [("a.test", 443), ("b.test", 443), ("c.test", 443), ("b.test", 443)]


# -- the package's shape ---------------------------------------------------------------------------


def test_client_package_never_imports_the_server_side_cache() -> None:
    """client/ is below cache.py: only the sesscache-tls: endpoint (a front door) may reach up."""
    package = Path(__file__).parent.parent / "twisted_sesscache" / "client"
    for path in package.glob("*.py"):
        if path.name == "endpoints.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [alias.name for alias in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )
            for name in names:
                assert name != "twisted_sesscache.cache" and not name.startswith(
                    ("twisted_sesscache.server", "twisted_sesscache.client.endpoints")
                ), f"{path.name} imports {name}"


@pytest.mark.parametrize("bad", [{"size": 0}, {"per_key": 0}])
def test_bounds_must_be_positive(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ClientSessionCache(**bad)  # type: ignore[arg-type]

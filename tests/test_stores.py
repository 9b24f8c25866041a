"""The memory store's own rules: TTL, LRU bound, set-if-absent, expiry in proportion to what expired."""

from __future__ import annotations

import pytest

from twisted_sesscache.stores import store_from_url
from twisted_sesscache.stores.memory import MemoryStore


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def value(d: object) -> object:
    return d.result  # type: ignore[attr-defined]


def test_ttl_and_lru_bound() -> None:
    clock = FakeTime()
    store = MemoryStore(max_entries=2, clock=clock)
    store.set(b"a", b"1", 10)
    store.set(b"b", b"2", 20)
    assert value(store.get(b"a")) == b"1"  # a is now the most recently used
    store.set(b"c", b"3", 30)
    assert value(store.get(b"b")) is None and len(store) == 2
    clock.now += 15
    assert value(store.get(b"a")) is None
    assert value(store.get(b"c")) == b"3"


def test_add_only_when_absent_or_expired() -> None:
    clock = FakeTime()
    store = MemoryStore(clock=clock)
    assert value(store.add(b"k", b"first", 10)) is True
    assert value(store.add(b"k", b"second", 10)) is False
    assert value(store.get(b"k")) == b"first"
    clock.now += 11
    assert value(store.add(b"k", b"third", 10)) is True


def test_expire_removes_exactly_the_expired_within_budget() -> None:
    clock = FakeTime()
    store = MemoryStore(clock=clock)
    for i in range(100):
        store.set(b"%d" % i, b"v", 10 + i)
    store.set(b"5", b"renewed", 500)  # a replaced key's old expiry must not remove it
    store.delete(b"7")
    clock.now += 10 + 50
    assert store.expire(budget=10) == 10
    assert store.expire() == 51 - 10 - 2  # 0..50 expired, minus the renewed and the deleted one
    assert value(store.get(b"5")) == b"renewed"
    assert len(store) == 100 - 51 + 1 - 0


def test_store_urls() -> None:
    assert isinstance(store_from_url("memory"), MemoryStore)
    with pytest.raises(ValueError, match="unknown store"):
        store_from_url("memcached://127.0.0.1")

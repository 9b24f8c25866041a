"""Every store provides the interfaces the cache relies on."""

from __future__ import annotations

from pathlib import Path

import pytest
from zope.interface.verify import verifyObject

from twisted_sesscache.interfaces import IExpiringStore, ISessionStore
from twisted_sesscache.stores import store_from_url
from twisted_sesscache.stores.memory import MemoryStore


def test_memory_store() -> None:
    store = MemoryStore()
    assert verifyObject(IExpiringStore, store) and verifyObject(ISessionStore, store)
    assert store.shared is False


def test_redis_store() -> None:
    pytest.importorskip("txredisapi", reason="the Redis store needs txredisapi (the redis extra)")
    store = store_from_url("redis://127.0.0.1:1/0")
    try:
        assert verifyObject(ISessionStore, store) and store.shared is True
    finally:
        store.close()

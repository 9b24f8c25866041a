"""The LMDB store: its rules through the store API, shared between real processes, and refused when foreign."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lmdb  # type: ignore[import-untyped]
import pytest

from tests.support import ReactorThread, TLSFiles, free_port, s_client, s_server
from tests.test_client import series
from tests.test_tap import assert_usage_error, files_args, run_twistd, twistd
from twisted_sesscache import RUNTIME
from twisted_sesscache.cache import SessionCache
from twisted_sesscache.stores import store_from_url
from twisted_sesscache.stores.lmdb import LMDBStore, StoreFileError

KEY = bytes(range(32))
shared_only = pytest.mark.skipif(
    not RUNTIME.shared,
    reason="server sessions reach a store through OpenSSL's session callbacks, which PyPI wheels do not "
    "expose (shared-OpenSSL runtime only)",
)


class FakeTime:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def value(d: object) -> object:
    return d.result  # type: ignore[attr-defined]


@pytest.fixture
def clock() -> FakeTime:
    return FakeTime()


def test_provides_the_store_interfaces(tmp_path: Path) -> None:
    from zope.interface.verify import verifyObject

    from twisted_sesscache.interfaces import IExpiringStore

    store = LMDBStore(tmp_path / "s")
    assert verifyObject(IExpiringStore, store) and store.shared and not store.keeps_deadlines
    store.close()


def test_records_expire_and_take_removes(tmp_path: Path, clock: FakeTime) -> None:
    store = LMDBStore(tmp_path / "s", clock=clock)
    store.set(b"a", b"1", 10)
    store.set(b"b", b"2", 20)
    assert value(store.get(b"a")) == b"1" and len(store) == 2
    assert value(store.take(b"b")) == b"2" and value(store.get(b"b")) is None and len(store) == 1
    clock.now += 11
    assert value(store.get(b"a")) is None  # expired: never answered, even before the flush
    assert value(store.add(b"a", b"3", 10)) is True and value(store.add(b"a", b"4", 10)) is False
    assert value(store.get(b"a")) == b"3"
    store.set(b"a", b"gone", 0)
    assert value(store.get(b"a")) is None and len(store) == 0
    store.close()


def test_expire_takes_the_oldest_in_bounded_slices(tmp_path: Path, clock: FakeTime) -> None:
    store = LMDBStore(tmp_path / "s", clock=clock)
    for i in range(100):
        store.set(b"%d" % i, b"v", 10 + i)
    store.set(b"5", b"renewed", 500)  # its old expiry must not remove it
    store.delete(b"7")
    clock.now += 10 + 50  # 0..50 expired
    assert store.expire(budget=10) == 10
    assert store.expire() == 51 - 10 - 2
    assert store.expire() == 0
    assert value(store.get(b"5")) == b"renewed" and value(store.get(b"60")) == b"v"
    assert len(store) == 100 - 51 + 1
    assert store.stats()["store_expired"] == 49
    store.close()


def test_writes_remove_expired_records_in_passing(tmp_path: Path, clock: FakeTime) -> None:
    """Without a flush loop (the bundled runtime), the file still sheds what expired."""
    store = LMDBStore(tmp_path / "s", clock=clock)
    for i in range(10):
        store.set(b"old%d" % i, b"v", 10)
    clock.now += 11
    for i in range(5):
        store.set(b"new%d" % i, b"v", 10)
    assert len(store) == 5 and store.stats()["store_expired"] == 10
    store.close()


def test_the_size_bound_holds_under_50000_sessions(tmp_path: Path) -> None:
    store = LMDBStore(tmp_path / "s", 1000)
    record = os.urandom(300)
    for i in range(50_000):
        store.set(b"%08d" % i, record, 300)
    assert len(store) == 1000
    assert value(store.get(b"%08d" % 49_999)) == record  # the newest stay
    assert value(store.get(b"%08d" % 48_999)) is None  # the oldest went
    assert store.stats()["store_evicted"] == 49_000 and store.stats()["store_errors"] == 0
    store.close()


def test_a_full_map_evicts_instead_of_failing(tmp_path: Path) -> None:
    store = LMDBStore(tmp_path / "s", 0, map_size=1 << 20)  # no count limit: the map is the bound
    for i in range(20_000):
        assert value(store.set(b"%08d" % i, os.urandom(300), 300)) is None
    assert 0 < len(store) < 20_000
    assert value(store.get(b"%08d" % 19_999)) is not None
    assert store.stats()["store_evicted"] > 0 and store.stats()["store_errors"] == 0
    store.close()


def test_records_outlive_the_process_and_the_count_is_shared(tmp_path: Path) -> None:
    store = LMDBStore(tmp_path / "s", 10)
    store.set(b"k", b"v", 300)
    store.close()
    reopened = store_from_url(f"lmdb:{tmp_path / 's'}", size=10)
    assert value(reopened.get(b"k")) == b"v"
    reopened.close()


TAKER = """
import sys
from twisted_sesscache.stores.lmdb import LMDBStore
store = LMDBStore(sys.argv[1], 0)
print(sum(1 for i in range(2000) if store.take(b"%d" % i).result is not None))
"""


def test_take_is_atomic_between_processes(tmp_path: Path) -> None:
    store = LMDBStore(tmp_path / "s", 0)
    for i in range(2000):
        store.set(b"%d" % i, b"ticket", 300)
    takers = [subprocess.Popen([sys.executable, "-c", TAKER, str(tmp_path / "s")], stdout=subprocess.PIPE)
              for _ in range(2)]
    taken = [int(p.communicate(timeout=60)[0]) for p in takers]
    assert sum(taken) == 2000, taken  # each record went to exactly one process
    assert len(store) == 0
    store.close()


# -- refused at start -------------------------------------------------------------------


def _filled(directory: Path) -> Path:
    store = LMDBStore(directory, 0)
    for i in range(3000):
        store.set(b"%d" % i, os.urandom(200), 300)
    store.close()
    return directory / "data.mdb"


def foreign_env(directory: Path) -> None:
    env = lmdb.open(str(directory))
    with env.begin(write=True) as txn:
        txn.put(b"someone", b"else")
    env.close()


def test_truncated_foreign_and_junk_files_are_refused(tmp_path: Path) -> None:
    data = _filled(tmp_path / "truncated")
    os.truncate(data, 64 * 1024)  # the file holds about 1.4 MB of pages
    with pytest.raises(StoreFileError, match="truncated"):
        LMDBStore(tmp_path / "truncated")
    foreign_env(tmp_path / "foreign")
    with pytest.raises(StoreFileError, match="not a twisted-sesscache store"):
        LMDBStore(tmp_path / "foreign")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "data.mdb").write_bytes(os.urandom(65536))
    with pytest.raises(StoreFileError, match="not a usable LMDB environment"):
        LMDBStore(tmp_path / "junk")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreFileError, match="not a directory"):
        LMDBStore(tmp_path / "file")


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_twistd_refuses_a_damaged_store_in_one_line(tmp_path: Path, tls_files: TLSFiles, damage: str) -> None:
    directory = tmp_path / "store"
    if damage == "truncated":
        data = _filled(directory)
        os.truncate(data, 64 * 1024)
    else:
        foreign_env(directory)
    done = run_twistd("-n", "--pidfile=", "sesscache", *files_args(tls_files), "--listen", f"tcp:{free_port()}",
                      "--store", f"lmdb:{directory}", "--store-key-file", str(tmp_path / "k"))
    assert_usage_error(done, "--store")
    assert done.returncode == 1


# -- shared between processes ---------------------------------------------------------


@shared_only
@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_two_twistd_processes_resume_each_others_sessions(tmp_path: Path, tls_files: TLSFiles, tls: str) -> None:
    ports = [free_port(), free_port()]
    common = ("--store", f"lmdb:{tmp_path / 'sessions'}", "--store-key-file", str(tmp_path / "sessions.key"))
    session = tmp_path / "s.pem"
    with twistd(tmp_path, "sesscache", *files_args(tls_files), "--listen", f"tcp:{ports[0]}:interface=127.0.0.1",
                *common) as first:
        first.wait_for(ports[0])
        with twistd(tmp_path, "sesscache", *files_args(tls_files),
                    "--listen", f"tcp:{ports[1]}:interface=127.0.0.1", *common) as second:
            second.wait_for(ports[1])
            assert s_client(ports[0], tls=tls, sess_out=session) == "New"
            assert s_client(ports[1], tls=tls, sess_in=session) == "Reused", second.output()
            assert s_client(ports[0], tls=tls, sess_in=session) == "Reused"


@pytest.mark.skipif(not RUNTIME.shared, reason="a scheduled flush (flush_interval) needs the shared-OpenSSL "
                    "runtime; under PyPI wheels records expire on writes (test_writes_remove_expired_records_in_passing)")
def test_the_flush_expires_store_records(reactor_thread: ReactorThread, tmp_path: Path, clock: FakeTime) -> None:
    from twisted.internet.task import Clock

    store = LMDBStore(tmp_path / "s", clock=clock)
    for i in range(50):
        store.set(b"%d" % i, b"v", 10)
    store.set(b"late", b"v", 100)
    reactor_clock = Clock()
    cache = SessionCache(store=store, store_keys=[KEY], flush_interval=1, clock=reactor_clock)
    cache.start()
    try:
        clock.now += 20
        reactor_clock.advance(1)
        assert len(store) == 1 and value(store.get(b"late")) == b"v"
    finally:
        cache.stop()
        store.close()


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_client_sessions_through_lmdb(reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path,
                                      tls: str) -> None:
    """Works in both runtimes: the client side reaches the store without OpenSSL's server callbacks."""
    store = LMDBStore(tmp_path / "s")
    with s_server(tls_files, tls) as port:
        first = SessionCache("client", store=store, store_keys=[KEY], store_timeout=2.0)
        creator = first.client_creator("localhost", trust_root=str(tls_files.certificate))
        assert series(reactor_thread, creator, port, count=2) == [False, True]
        second = SessionCache("client", store=store, store_keys=[KEY], store_timeout=2.0)
        creator = second.client_creator("localhost", trust_root=str(tls_files.certificate))
        assert series(reactor_thread, creator, port, count=2) == [True, True]
    assert reactor_thread.call(second.stats)["client"]["store_hits"] >= 1
    store.close()

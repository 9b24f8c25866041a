"""Server-side session caching over real handshakes on loopback."""

from __future__ import annotations

import gc
import socket
import ssl
import time
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from tests.support import ReactorThread, TLSFiles, resume_series, s_client, tls_server
from twisted_sesscache import RUNTIME, CacheMode, SessionCache
from twisted_sesscache.certs import certificate_options, load_certificate
from twisted_sesscache.server.creator import derived_session_id_context

SHARED_WHY = "cache size, flush, add/remove and OpenSSL's counters are not reachable through PyPI wheels"


def serve(rt: ReactorThread, cache: SessionCache, files: TLSFiles, factory: Any = None) -> Any:
    return tls_server(rt, cache.server_context_factory(certificate_options(files.certificate, files.private_key)), factory)


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_openssl_client_resumes(reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path, tls: str) -> None:
    cache = SessionCache()
    with serve(reactor_thread, cache, tls_files) as port:
        assert resume_series(port, tmp_path, 4, tls=tls) == ["New", "Reused", "Reused", "Reused"]
    stats = reactor_thread.call(cache.stats)
    assert stats["hits"] == 3 and stats["accept_good"] == 4


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_mode_off_never_resumes(reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path, tls: str) -> None:
    cache = SessionCache(CacheMode.OFF)
    with serve(reactor_thread, cache, tls_files) as port:
        assert resume_series(port, tmp_path, 3, tls=tls) == ["New", "New", "New"]
    assert reactor_thread.call(cache.stats)["hits"] == 0


def test_plain_twisted_never_resumes(reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path) -> None:
    """The baseline this project exists for: Twisted's defaults turn the cache off."""
    options = certificate_options(tls_files.certificate, tls_files.private_key)
    with tls_server(reactor_thread, options) as port:
        assert resume_series(port, tmp_path, 2) == ["New", "New"]


def test_other_session_id_context_does_not_resume(
    reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path
) -> None:
    first, second = SessionCache(session_id_context="first"), SessionCache(session_id_context="second")
    session = tmp_path / "first.pem"
    with serve(reactor_thread, first, tls_files) as port_a, serve(reactor_thread, second, tls_files) as port_b:
        assert s_client(port_a, sess_out=session) == "New"
        assert s_client(port_b, sess_in=session) == "New"
        assert s_client(port_a, sess_in=session) == "Reused"


def test_derived_session_id_context(tls_files: TLSFiles, other_tls_files: TLSFiles) -> None:
    """Equal configurations (two processes, a restart) derive the same context; another
    certificate or another client-certificate policy derives another one."""
    first = derived_session_id_context(certificate_options(tls_files.certificate, tls_files.private_key))
    again = derived_session_id_context(certificate_options(tls_files.certificate, tls_files.private_key))
    other = derived_session_id_context(certificate_options(other_tls_files.certificate, other_tls_files.private_key))
    stricter = derived_session_id_context(
        certificate_options(
            tls_files.certificate, tls_files.private_key, verify=True, caCerts=load_certificate(tls_files.certificate)
        )
    )
    assert first is not None and len(first) == 32
    assert first == again
    assert len({first, other, stricter}) == 3


@pytest.mark.shared_only(SHARED_WHY)
def test_timeout_and_scheduled_flush(reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path) -> None:
    cache = SessionCache(timeout=1, flush_interval=1)
    assert cache.mode & CacheMode.NO_AUTO_CLEAR
    session = tmp_path / "stale.pem"
    with serve(reactor_thread, cache, tls_files) as port:
        reactor_thread.call(cache.start)
        try:
            for _ in range(3):
                s_client(port)
            assert s_client(port, sess_out=session) == "New"
            assert reactor_thread.call(cache.stats)["number"] == 4
            deadline = time.monotonic() + 10
            while reactor_thread.call(cache.stats)["number"] and time.monotonic() < deadline:
                time.sleep(0.2)
            stats = reactor_thread.call(cache.stats)
            assert stats["number"] == 0
            assert stats["flushed"] == 4 and stats["flushes"] >= 1
            assert s_client(port, sess_in=session) == "New"
        finally:
            reactor_thread.call(cache.stop)


@pytest.mark.shared_only(SHARED_WHY)
def test_flush_removes_exactly_the_expired(reactor_thread: ReactorThread, tls_files: TLSFiles) -> None:
    cache = SessionCache(timeout=100)
    with serve(reactor_thread, cache, tls_files) as port:
        for _ in range(5):
            s_client(port)
    now = time.time()
    assert reactor_thread.call(cache.flush, now) == 0
    assert reactor_thread.call(cache.flush, now + 200) == 5
    assert reactor_thread.call(cache.stats)["number"] == 0


@pytest.mark.shared_only(SHARED_WHY)
def test_size_limit(reactor_thread: ReactorThread, tls_files: TLSFiles) -> None:
    cache = SessionCache(size=10)
    with serve(reactor_thread, cache, tls_files) as port:
        for _ in range(50):
            s_client(port)
    stats = reactor_thread.call(cache.stats)
    assert stats["size_limit"] == 10
    assert stats["number"] <= 10
    assert stats["cache_full"] > 0


@pytest.mark.shared_only(SHARED_WHY)
def test_flush_loop_runs_on_the_given_clock() -> None:
    clock = Clock()
    cache = SessionCache(flush_interval=30)
    cache.attach(CertificateOptions().getContext())
    cache.start(clock)
    clock.advance(30)
    clock.advance(30)
    assert cache.stats()["flushes"] == 2
    cache.stop()
    clock.advance(300)
    assert cache.stats()["flushes"] == 2
    assert not clock.getDelayedCalls()


@pytest.mark.shared_only(SHARED_WHY)
def test_the_first_tick_flushes_from_the_start_not_an_hour_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """One slice per second since the start: a cache started long after the epoch walks back no hour."""
    clock = Clock()
    clock.advance(1_000_000)
    cache = SessionCache(flush_interval=10)
    cache.attach(CertificateOptions().getContext())
    moments: list[int] = []

    def flush_until(moment: int) -> int:
        moments.append(moment)
        return 0

    monkeypatch.setattr(cache.flushing, "flush_until", flush_until)
    cache.start(clock)
    clock.advance(10)
    assert moments == list(range(1_000_001, 1_000_011))
    cache.stop()


class SessionGrabber(protocol.Protocol):
    """Keeps the server-side session of each connection, for add/remove."""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.factory.sessions.append(cast(TLSMemoryBIOProtocol, self.transport).getHandle().get_session())
        self.transport.write(b"HTTP/1.0 200 OK\r\n\r\nok\n")
        self.transport.loseConnection()


class GrabbingFactory(protocol.Factory[SessionGrabber]):
    """Builds SessionGrabbers; holds the sessions they keep."""

    sessions: list[Any]


def grabbing_factory() -> GrabbingFactory:
    factory = GrabbingFactory()
    factory.protocol = SessionGrabber
    factory.sessions = []
    return factory


@pytest.mark.shared_only(SHARED_WHY)
def test_add_and_remove_follow_openssl_return_rules(
    reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path
) -> None:
    cache = SessionCache()
    factory = grabbing_factory()
    session_file = tmp_path / "s.pem"
    with serve(reactor_thread, cache, tls_files, factory) as port:
        assert s_client(port, sess_out=session_file) == "New"
        (session,) = factory.sessions
        assert reactor_thread.call(cache.add, session) is False  # this very object is cached
        copy = RUNTIME.session_from_der(RUNTIME.session_to_der(session))
        assert reactor_thread.call(cache.add, copy) is True  # another object, same ID: replaced
        assert reactor_thread.call(cache.stats)["number"] == 1
        assert reactor_thread.call(cache.remove, copy) is True
        assert reactor_thread.call(cache.remove, copy) is False
        assert reactor_thread.call(cache.stats)["number"] == 0
        assert s_client(port, sess_in=session_file) == "New"


@pytest.mark.shared_only(SHARED_WHY)
@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_no_internal_store_resumes_only_added_sessions(
    reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path, tls: str
) -> None:
    cache = SessionCache("server,no-internal-store")
    factory = grabbing_factory()
    kept, dropped = tmp_path / "kept.pem", tmp_path / "dropped.pem"
    with serve(reactor_thread, cache, tls_files, factory) as port:
        assert s_client(port, tls=tls, sess_out=kept) == "New"
        assert s_client(port, tls=tls, sess_out=dropped) == "New"
        assert reactor_thread.call(cache.stats)["number"] == 0
        assert reactor_thread.call(cache.add, factory.sessions[0]) is True
        assert s_client(port, tls=tls, sess_in=kept) == "Reused"
        assert s_client(port, tls=tls, sess_in=dropped) == "New"


@pytest.mark.shared_only(SHARED_WHY)
def test_no_internal_lookup_ignores_the_internal_cache(
    reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path
) -> None:
    cache = SessionCache("server,no-internal-lookup")
    with serve(reactor_thread, cache, tls_files) as port:
        assert resume_series(port, tmp_path, 2) == ["New", "New"]
    assert reactor_thread.call(cache.stats)["number"] == 2  # stored, never looked up


@pytest.mark.shared_only(SHARED_WHY)
def test_hundred_thousand_mixed_operations_stay_bounded(
    reactor_thread: ReactorThread, tls_files: TLSFiles
) -> None:
    cache = SessionCache(size=8)
    factory = grabbing_factory()
    with serve(reactor_thread, cache, tls_files, factory) as port:
        for _ in range(12):
            s_client(port)
    ders = [RUNTIME.session_to_der(s) for s in factory.sessions]

    def churn() -> tuple[int, int]:
        rss_before = _rss()
        held: list[Any] = []
        for i in range(100_000):
            step = i % 5
            if step in (0, 1):
                held.append(RUNTIME.session_from_der(ders[i % len(ders)]))
                cache.add(held[-1])
            elif step in (2, 3) and held:
                cache.remove(held.pop(i % len(held)))
            else:
                cache.flush(time.time() + (0 if i % 10 else 10_000))
            if len(held) > 64:
                del held[:32]  # connections ending: Python drops its references
        return rss_before, _rss()

    before, after = reactor_thread.call(churn)
    stats = reactor_thread.call(cache.stats)
    assert stats["number"] <= 8
    assert after - before < 32 * 1024 * 1024, f"RSS grew by {(after - before) / 2**20:.1f} MiB"


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


class LossRecorder(protocol.Protocol):
    """Answers, leaves the connection open, and records how it ended."""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"pong")

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.factory.reasons.append(reason.type)
        if not self.factory.lost.called:
            self.factory.lost.callback(None)


class LossFactory(protocol.Factory[LossRecorder]):
    """Builds LossRecorders; holds how their connections ended, and fires ``lost`` at each end."""

    reasons: list[type[BaseException] | None]
    lost: Deferred[None]


def abrupt_client(
    context: ssl.SSLContext, port: int, session: ssl.SSLSession | None
) -> tuple[bool | None, ssl.SSLSession | None]:
    """A TLS 1.2 client that closes TCP without close_notify, like many real ones."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = context.wrap_socket(raw, session=session)
    tls.sendall(b"ping")
    assert tls.recv(4) == b"pong"
    reused, new_session = tls.session_reused, tls.session
    raw.detach()
    socket.socket(fileno=tls.detach()).close()  # no close_notify
    return reused, new_session


@pytest.mark.parametrize("keep", [True, False], ids=["keep", "strict"])
def test_abrupt_close_keeps_session_and_reports_truncation(
    reactor_thread: ReactorThread, tls_files: TLSFiles, keep: bool
) -> None:
    cache = SessionCache(keep_sessions_on_truncation=keep)
    factory = LossFactory()
    factory.protocol = LossRecorder
    factory.reasons = []
    with serve(reactor_thread, cache, tls_files, factory) as port:
        resumed = []
        session = None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        for _ in range(3):
            factory.lost = Deferred()
            reused, session = abrupt_client(context, port, session)
            resumed.append(reused)
            reactor_thread.call(lambda: factory.lost)
            gc.collect()  # SSL_free must not evict the session either
    assert resumed == ([False, True, True] if keep else [False, False, False])
    # Either way, the application learns that the peer did not close cleanly.
    assert factory.reasons == [ConnectionLost] * 3
    assert ConnectionDone not in factory.reasons


def test_one_cache_many_contexts(reactor_thread: ReactorThread, tls_files: TLSFiles, other_tls_files: TLSFiles, tmp_path: Path) -> None:
    cache = SessionCache(timeout=123)
    with serve(reactor_thread, cache, tls_files) as port_a, serve(reactor_thread, cache, other_tls_files) as port_b:
        assert resume_series(port_a, tmp_path, 2) == ["New", "Reused"]
        assert resume_series(port_b, tmp_path, 2) == ["New", "Reused"]
    stats = reactor_thread.call(cache.stats)
    assert stats["contexts"] == 2
    assert stats["hits"] == 2 and stats["accept_good"] == 4
    assert all(context.get_timeout() == 123 for context in cache.contexts)


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_misses_count_only_offered_sessions(
    reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path, tls: str
) -> None:
    """New clients are not misses (TLS 1.3 hellos carry a random legacy session ID);
    a session the server no longer knows is."""
    session = tmp_path / "s.pem"
    with serve(reactor_thread, SessionCache(), tls_files) as first:
        assert s_client(first, tls=tls, sess_out=session) == "New"
    cache = SessionCache()
    with serve(reactor_thread, cache, tls_files) as second:
        assert s_client(second, tls=tls) == "New"
        assert s_client(second, tls=tls, sess_in=session) == "New"
    stats = reactor_thread.call(cache.stats)
    assert stats["accept_good"] == 2 and stats["misses"] == 1 and stats["hits"] == 0

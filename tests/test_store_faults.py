"""The Redis store under faults, with real redis-server processes: it always comes back by itself.

For each fault: writes and reads run all along; once Redis answers again the
store works within a few seconds, without a restart; reconnects are counted;
the log has one warning and one recovery line and no unhandled error. The
figures (seconds to recover, calls failed) are printed: run with ``-s``.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, globalLogPublisher

from tests.support import REDIS_SERVER, ReactorThread, RedisProcess, free_port, wait_for_port
from twisted_sesscache.stores.redis import RedisStore

RECOVERY_BUDGET = 6.0  # seconds after Redis answers again


@dataclass
class Traffic:
    """A set and a get every 20 ms on the reactor thread; when each succeeded or failed."""

    store: RedisStore
    ok: list[float] = field(default_factory=list)
    failed: list[float] = field(default_factory=list)
    n: int = 0

    def start(self) -> None:
        self.loop = LoopingCall(self.tick)
        self.loop.start(0.02)

    def stop(self) -> None:
        self.loop.stop()

    def tick(self) -> None:
        self.n += 1
        key = b"t%d" % self.n
        done = self.store.set(key, b"value", 60).addCallback(lambda _: self.store.get(key))

        def check(value: Any) -> None:
            assert value == b"value"
            self.ok.append(time.monotonic())

        done.addCallback(check).addErrback(lambda _: self.failed.append(time.monotonic()))

    def first_ok_after(self, moment: float, budget: float) -> float | None:
        deadline = time.monotonic() + budget
        while time.monotonic() < deadline:
            later = [t for t in list(self.ok) if t > moment]
            if later:
                return later[0]
            time.sleep(0.05)
        return None


@contextmanager
def captured() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(cast(ILogObserver, events.append))
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(cast(ILogObserver, events.append))


@dataclass
class Outcome:
    recovered: float  # seconds from Redis answering again to a working set+get
    failed_during: int
    stats: dict[str, int]
    warnings: list[dict[str, Any]]
    recoveries: list[dict[str, Any]]
    unhandled: list[dict[str, Any]]
    faulted_at: float  # wall-clock time (as log_time) when the fault had happened

    def warned_after(self) -> float:
        """Seconds from the fault to the store's warning."""
        return float(self.warnings[0]["log_time"]) - self.faulted_at


def exercise(
    reactor_thread: ReactorThread,
    url: str,
    name: str,
    *,
    fault: Callable[[], None],
    heal: Callable[[], None],
    broken_from_start: bool = False,
    seconds: float = 4.0,
) -> Outcome:
    """Traffic through a store while ``fault`` .. ``heal`` happen; how it went."""
    with captured() as events:
        if broken_from_start:
            fault()
        store = reactor_thread.call(RedisStore.from_url, url)
        traffic = Traffic(store)
        reactor_thread.call(traffic.start)
        try:
            if not broken_from_start:
                assert traffic.first_ok_after(0, 5) is not None, "the store never worked before the fault"
                fault()
            began, faulted_at = time.monotonic(), time.time()
            time.sleep(seconds)
            heal()
            healed = time.monotonic()
            first = traffic.first_ok_after(healed, 20)
            assert first is not None, f"{name}: the store did not come back within 20 s"
            time.sleep(0.5)  # let the recovery line and counters settle
            stats = reactor_thread.call(store.stats)
        finally:
            reactor_thread.call(traffic.stop)
            reactor_thread.call(store.close)
    failed = len([t for t in traffic.failed if began <= t <= first])
    outcome = Outcome(
        recovered=first - healed,
        failed_during=failed,
        stats=stats,
        warnings=[e for e in events if "is unavailable" in str(e.get("log_format", ""))],
        recoveries=[e for e in events if "answers again" in str(e.get("log_format", ""))],
        unhandled=[e for e in events if "log_failure" in e],
        faulted_at=faulted_at,
    )
    print(f"\nFAULT {name}: recovered {outcome.recovered:.2f} s after Redis answered again; "
          f"{failed} of {failed + len([t for t in traffic.ok if began <= t <= first])} set+get failed during the fault; "
          f"store_reconnects={stats['store_reconnects']} store_errors={stats['store_errors']} "
          f"store_request_timeouts={stats['store_request_timeouts']}; "
          + (f"warned {outcome.warned_after():.2f} s after the fault: {outcome.warnings[0]['error']}"
             if outcome.warnings else "no warning"))
    return outcome


def assert_came_back(outcome: Outcome, *, reconnected: bool = True) -> None:
    assert outcome.recovered < RECOVERY_BUDGET
    assert outcome.stats["store_connected"] == 1
    if reconnected:
        assert outcome.stats["store_reconnects"] >= 1
    assert len(outcome.warnings) == 1, [e.get("error") for e in outcome.warnings]
    assert len(outcome.recoveries) == 1
    assert outcome.unhandled == []


@pytest.fixture
def debug_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path, "--enable-debug-command", "yes")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _send_only(port: int, *args: str) -> None:
    """A command whose answer nobody waits for (DEBUG SLEEP blocks its own client too)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall((f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)).encode())
        time.sleep(0.1)


def test_debug_sleep_during_writes(reactor_thread: ReactorThread, debug_redis: RedisProcess) -> None:
    """A stall longer than the reply timeout (txredisapi alone never reconnected after it)."""
    state: dict[str, float] = {}

    def fault() -> None:
        state["until"] = time.monotonic() + 6
        threading.Thread(target=_send_only, args=(debug_redis.port, "DEBUG", "SLEEP", "6"), daemon=True).start()

    def heal() -> None:
        time.sleep(max(0.0, state["until"] - time.monotonic()))

    outcome = exercise(reactor_thread, debug_redis.url, "DEBUG SLEEP 6", fault=fault, heal=heal, seconds=1)
    assert_came_back(outcome)  # connections silent for longer than 3 s were replaced


def test_sigstop_sigcont(reactor_thread: ReactorThread, redis: RedisProcess) -> None:
    outcome = exercise(reactor_thread, redis.url, "SIGSTOP 6 s", fault=redis.pause, heal=redis.resume, seconds=6)
    assert_came_back(outcome)


def test_kill_and_restart(reactor_thread: ReactorThread, redis: RedisProcess) -> None:
    def kill() -> None:
        assert redis.process is not None
        redis.process.kill()
        redis.process.wait(5)
        redis.process = None

    outcome = exercise(reactor_thread, redis.url, "kill -9, restart on the same port 4 s later",
                       fault=kill, heal=redis.start)
    assert_came_back(outcome)
    assert outcome.warned_after() < 1.0  # a refused reconnect says so at once, no probe timeout later


@contextmanager
def silent_listener(port: int) -> Iterator[Callable[[], None]]:
    """Accepts connections on ``port`` and never answers; the callable closes it and all it accepted."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)
    listener.settimeout(0.1)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def close() -> None:
        stop.set()
        thread.join(5)
        listener.close()
        for conn in accepted:
            conn.close()

    try:
        yield close
    finally:
        close()


def test_silent_listener_replaced_by_redis(reactor_thread: ReactorThread, tmp_path: Path) -> None:
    port = free_port()
    server = RedisProcess(tmp_path, port=port)
    with silent_listener(port) as close:
        def heal() -> None:
            close()
            server.start()

        try:
            outcome = exercise(reactor_thread, server.url, "silent listener, then Redis on its port",
                               fault=lambda: None, heal=heal, broken_from_start=True)
        finally:
            server.stop()
    assert_came_back(outcome, reconnected=False)  # its first usable connections are no reconnects
    assert "answered" in outcome.warnings[0]["error"] or "Timeout" in outcome.warnings[0]["error"]


def test_wrong_password_then_fixed(reactor_thread: ReactorThread, tmp_path: Path) -> None:
    server = RedisProcess(tmp_path, "--requirepass", "other")
    server.start()

    def heal() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
            conn.sendall(b"AUTH other\r\nCONFIG SET requirepass secret\r\n")
            time.sleep(0.2)
            assert conn.recv(1000).count(b"+OK") == 2

    try:
        outcome = exercise(reactor_thread, f"redis://:secret@127.0.0.1:{server.port}/0", "wrong password, then fixed",
                           fault=lambda: None, heal=heal, broken_from_start=True)
    finally:
        server.stop()
    assert_came_back(outcome, reconnected=False)
    assert "WRONGPASS" in outcome.warnings[0]["error"] or "invalid" in outcome.warnings[0]["error"]


class SentinelSetup:
    """A primary, a replica and three sentinels on loopback (down after 1 s)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.primary = RedisProcess(directory / "primary")
        self.replica = RedisProcess(directory / "replica", "--replicaof", "127.0.0.1", str(self.primary.port))
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        nodes = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{nodes}/svc/0"

    def start(self) -> None:
        for server in (self.primary, self.replica):
            server.directory.mkdir(parents=True, exist_ok=True)
            server.start()
        for i, port in enumerate(self.sentinel_ports):
            conf = self.directory / f"sentinel{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"sentinel monitor svc 127.0.0.1 {self.primary.port} 2\n"
                "sentinel down-after-milliseconds svc 1000\nsentinel failover-timeout svc 3000\n"
                "sentinel parallel-syncs svc 1\n"
            )
            process = subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.sentinels.append(process)
            wait_for_port(port, process=process)
        self._wait_until(lambda: "master_link_status:up" in self.replica.command("INFO", "replication"))
        for port in self.sentinel_ports:
            self._wait_until(lambda: "OK 3 usable" in _command(port, "SENTINEL", "CKQUORUM", "svc")
                             and ":0\r\n" not in _count_replicas(port))

    def stop(self) -> None:
        for process in self.sentinels:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self.replica.stop()
        self.primary.stop()

    @staticmethod
    def _wait_until(condition: Callable[[], bool], seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline, "the Sentinel setup did not settle"
            time.sleep(0.2)


def _command(port: int, *args: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall((f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)).encode())
        return conn.recv(1 << 16).decode("latin-1")


def _count_replicas(port: int) -> str:
    reply = _command(port, "SENTINEL", "REPLICAS", "svc")
    return ":0\r\n" if reply.startswith("*0") else reply


def test_sentinel_failover(reactor_thread: ReactorThread, tmp_path: Path) -> None:
    setup = SentinelSetup(tmp_path)
    setup.start()
    state: dict[str, float] = {}

    def kill_primary() -> None:
        state["killed"] = time.monotonic()
        setup.primary.stop()

    def promoted() -> None:
        deadline = time.monotonic() + 20
        while "role:master" not in setup.replica.command("INFO", "replication"):
            assert time.monotonic() < deadline, "Sentinel never promoted the replica"
            time.sleep(0.05)
        state["promoted"] = time.monotonic()

    try:
        outcome = exercise(reactor_thread, setup.url, "Sentinel failover (primary killed)",
                           fault=kill_primary, heal=promoted, seconds=0.1)
    finally:
        setup.stop()
    print(f"FAULT Sentinel failover: replica promoted {state['promoted'] - state['killed']:.2f} s after the kill; "
          f"store working {state['promoted'] - state['killed'] + outcome.recovered:.2f} s after the kill")
    assert_came_back(outcome)  # however quick the failover: the primary's port refuses until then
    assert outcome.warned_after() < 1.0


KEY = bytes(range(32))


@pytest.mark.parametrize("fault", ["sigstop", "restart"])
def test_resumption_through_a_fault_end_to_end(
    reactor_thread: ReactorThread, tls_files: Any, tmp_path: Path, redis: RedisProcess, fault: str
) -> None:
    """Two listeners share Redis, ``openssl s_client`` all along: no handshake fails, resumption comes back."""
    from tests.support import s_client, tls_server
    from twisted_sesscache import RUNTIME, SessionCache
    from twisted_sesscache.certs import certificate_options

    if not RUNTIME.shared:
        pytest.skip("the server-side external store needs OpenSSL's session callbacks (shared-OpenSSL runtime only)")
    store = reactor_thread.call(RedisStore.from_url, redis.url)
    caches = [SessionCache(store=store, store_keys=[KEY], store_timeout=0.2) for _ in range(2)]
    options = [certificate_options(tls_files.certificate, tls_files.private_key) for _ in caches]  # two SSL_CTX
    session = tmp_path / "s.pem"

    def cross_process_resumption() -> str:
        # Without tickets, only the store can carry a session from one listener to the other.
        s_client(ports[0], sess_out=session, extra=("-no_ticket",))
        time.sleep(0.05)  # the write to the store is asynchronous
        return s_client(ports[1], sess_in=session, extra=("-no_ticket",))

    with captured() as events, tls_server(reactor_thread, caches[0].server_context_factory(options[0])) as a, \
            tls_server(reactor_thread, caches[1].server_context_factory(options[1])) as b:
        ports = [a, b]
        assert cross_process_resumption() == "Reused"
        if fault == "sigstop":
            redis.pause()
        else:
            redis.stop()
        results, failed = [], 0
        ends = time.monotonic() + 5
        while time.monotonic() < ends:
            try:
                results.append(cross_process_resumption())
            except AssertionError:
                failed += 1
        redis.resume() if fault == "sigstop" else redis.start()
        back = time.monotonic()
        deadline = back + 15
        while cross_process_resumption() != "Reused":
            assert time.monotonic() < deadline, "resumption across listeners never came back"
            time.sleep(0.1)
        recovered = time.monotonic() - back
    reactor_thread.call(store.close)
    print(f"\nEND-TO-END {fault}: {failed} handshakes failed during the fault "
          f"({len(results)} pairs, {results.count('Reused')} resumed across listeners); "
          f"resumption back {recovered:.2f} s after Redis answered again")
    assert failed == 0
    assert recovered < RECOVERY_BUDGET
    assert [e for e in events if "log_failure" in e] == []
    assert len([e for e in events if "is unavailable" in str(e.get("log_format", ""))]) == 1

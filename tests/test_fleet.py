"""Three ``twistd sesscache`` processes and one Redis: sessions made on one resume on the others."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support import RedisProcess, TLSFiles, free_port, s_client
from tests.test_tap import Twistd, files_args, get, twistd

pytestmark = [
    pytest.mark.shared_only("the server-side shared store uses OpenSSL's session callbacks, which PyPI wheels do not expose"),
    pytest.mark.slow,
]


@contextmanager
def fleet(tmp: Path, files: TLSFiles, redis: RedisProcess, *extra: str, count: int = 3) -> Iterator[list[tuple[int, int]]]:
    """``count`` processes; yields (TLS port, stats port) of each."""
    key_file = tmp / "store.key"
    ports = [(free_port(), free_port()) for _ in range(count)]
    with ExitStack() as stack:
        processes: list[Twistd] = []
        for tls_port, stats_port in ports:
            processes.append(
                stack.enter_context(
                    twistd(
                        tmp, "sesscache", *files_args(files),
                        "--listen", f"tcp:{tls_port}:interface=127.0.0.1",
                        "--stats", f"tcp:{stats_port}:interface=127.0.0.1",
                        "--store", redis.url, "--store-key-file", str(key_file), *extra,
                    )
                )
            )
        for process, (tls_port, stats_port) in zip(processes, ports):
            process.wait_for(tls_port, stats_port)
        yield ports


def stats(stats_port: int) -> dict[str, Any]:
    return json.loads(get(f"http://127.0.0.1:{stats_port}/stats.json"))


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_sessions_resume_across_processes(tmp_path: Path, tls_files: TLSFiles, redis: RedisProcess, tls: str) -> None:
    session = tmp_path / "s.pem"
    with fleet(tmp_path, tls_files, redis) as ports:
        assert s_client(ports[0][0], tls=tls, sess_out=session) == "New"
        time.sleep(0.1)
        assert s_client(ports[1][0], tls=tls, sess_in=session) == "Reused"
        assert s_client(ports[2][0], tls=tls, sess_in=session) == "Reused"
        assert [stats(p[1])["store_hits"] for p in ports[1:]] == [1, 1]
        assert stats(ports[0][1])["store_writes"] >= 1


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_shared_ticket_keys_across_processes(tmp_path: Path, tls_files: TLSFiles, redis: RedisProcess, tls: str) -> None:
    session = tmp_path / "s.pem"
    with fleet(tmp_path, tls_files, redis, "--tickets", "shared") as ports:
        time.sleep(0.3)  # each process fetches the epoch's key at start
        assert s_client(ports[0][0], tls=tls, sess_out=session) == "New"
        assert s_client(ports[1][0], tls=tls, sess_in=session) == "Reused"
        assert s_client(ports[2][0], tls=tls, sess_in=session) == "Reused"
        assert all(stats(p[1])["store_hits"] == 0 for p in ports), "tickets, not stored sessions, resumed"


def test_tickets_survive_a_key_rotation_across_processes(
    tmp_path: Path, tls_files: TLSFiles, redis: RedisProcess
) -> None:
    session = tmp_path / "s.pem"
    with fleet(tmp_path, tls_files, redis, "--tickets", "shared", "--ticket-key-rotation", "1", count=2) as ports:
        time.sleep(0.3)
        assert s_client(ports[0][0], sess_out=session) == "New"
        time.sleep(1.6)  # the next epoch's key takes over (each refresh runs every rotation/4)
        assert s_client(ports[1][0], sess_in=session) == "Reused"


BURST = 300


def _tls12_client() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # session IDs: every resumption is a store lookup
    context.options |= ssl.OP_NO_TICKET
    return context


def _visit(context: ssl.SSLContext, port: int, session: ssl.SSLSession | None = None) -> tuple[bool, ssl.SSLSession]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with context.wrap_socket(raw, session=session) as tls:
            tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
            while tls.recv(65536):
                pass
            return tls.session_reused, tls.session  # type: ignore[return-value]


def test_a_burst_of_cross_process_resumptions(tmp_path: Path, tls_files: TLSFiles, redis: RedisProcess) -> None:
    """300 sessions made on one process, offered to another all at once, with the default 50 ms budget."""
    context = _tls12_client()
    with fleet(tmp_path, tls_files, redis, "--strict-truncation", count=2) as ports:
        sessions = [_visit(context, ports[0][0])[1] for _ in range(BURST)]
        time.sleep(0.5)  # the writes are never waited on: let them land
        start = threading.Barrier(BURST)
        results: list[bool] = []

        def resume(session: ssl.SSLSession) -> None:
            start.wait(timeout=60)
            results.append(_visit(context, ports[1][0], session)[0])

        threads = [threading.Thread(target=resume, args=(session,)) for session in sessions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        counters = stats(ports[1][1])
    resumed = sum(results)
    print(f"MEASURED burst: {resumed} of {BURST} resumed on the other process; store counters {counters}")
    assert len(results) == BURST
    assert resumed >= 0.95 * BURST, (resumed, counters)

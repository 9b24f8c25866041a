"""Failed handshakes reach /stats.json and /metrics, from twistd sesscache and from the sesscache: endpoint."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.internet.protocol import Factory

from tests.support import InfoProtocol, ReactorThread, TLSFiles, free_port, s_client
from tests.test_tap import get, parse_metrics, twistd


def plain_http(port: int) -> bytes:
    """What a browser typing http:// for an https:// port sends, and what comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        raw.settimeout(10)
        chunks = []
        try:
            while chunk := raw.recv(4096):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
        return b"".join(chunks)


def test_twistd_counts_failed_handshakes_in_stats_and_metrics(tmp_path: Path) -> None:
    port, stats_port = free_port(), free_port()
    with twistd(tmp_path, "sesscache", "--generate-certificate", "--listen", f"tcp:{port}:interface=127.0.0.1",
                "--stats", f"tcp:{stats_port}:interface=127.0.0.1") as process:
        process.wait_for(port, stats_port)  # its probe connects and closes: a failure of its own
        before = json.loads(get(f"http://127.0.0.1:{stats_port}/stats.json"))["handshake_failures"]
        plain_http(port)
        plain_http(port)
        assert s_client(port) == "New"  # and it serves on
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stats = json.loads(get(f"http://127.0.0.1:{stats_port}/stats.json"))
            if stats["handshake_failures"] >= before + 2:
                break
            time.sleep(0.1)
        metrics = parse_metrics(get(f"http://127.0.0.1:{stats_port}/metrics").decode())
    assert stats["handshake_failures"] == before + 2 and stats["handshake_timeouts"] == 0
    assert metrics["sesscache_handshake_failures_total"] == before + 2
    assert metrics["sesscache_handshake_timeouts_total"] == 0.0
    assert process.output().count("failed: http request") == 2, process.output()


def test_the_endpoint_guards_any_factory(reactor_thread: ReactorThread, tls_files: TLSFiles) -> None:
    rt = reactor_thread
    description = (f"sesscache:0:interface=127.0.0.1:certificate={quoteStringArgument(str(tls_files.certificate))}"
                   f":privateKey={quoteStringArgument(str(tls_files.private_key))}")
    endpoint = serverFromString(reactor, description)
    port = rt.call(endpoint.listen, Factory.forProtocol(InfoProtocol))
    try:
        number = port.getHost().port
        plain_http(number)
        assert s_client(number) == "New"
        deadline = time.monotonic() + 10
        while rt.call(endpoint.cache.stats)["handshake_failures"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = rt.call(endpoint.cache.stats)
    finally:
        rt.call(port.stopListening)
    assert stats["handshake_failures"] == 1 and stats["accept_good"] >= 1

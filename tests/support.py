"""Test harness: the reactor on a thread, TLS servers in it, outside peers beside it.

Tests stay synchronous: they ask the reactor thread to start listeners or
run Twisted clients (``ReactorThread.call``), and run ``openssl`` peers as
subprocesses from the test thread. Every listener and process a test starts
is stopped by the same test (fixtures or ``try/finally``).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast, overload

from twisted.internet import protocol
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ISystemHandle
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.threads import blockingCallFromThread

from bench.processes import free_port, spawn, started, stop, wait_for_port
from twisted_sesscache.certs import generate_self_signed

T = TypeVar("T")
P = ParamSpec("P")
# Twisted types its global reactor as a few common interfaces; the one installed here
# (epoll, or whichever a POSIX platform picks) is a PosixReactorBase: SSL, threads, run().
reactor = cast(PosixReactorBase, _reactor)
OPENSSL = shutil.which("openssl") or "openssl"
PEER_TIMEOUT = 15


@dataclass(frozen=True)
class TLSFiles:
    certificate: Path
    private_key: Path


def make_tls_files(directory: Path) -> TLSFiles:
    cert, key = generate_self_signed(directory)
    return TLSFiles(cert, key)


class ReactorThread:
    """Runs the global reactor on a daemon thread for the whole test session."""

    def __init__(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reactor", daemon=True)

    def _run(self) -> None:
        reactor.run(installSignalHandlers=False)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not reactor.running and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        reactor.callFromThread(reactor.stop)
        self._thread.join(10)

    @overload
    def call(self, function: Callable[P, Deferred[T]], *args: P.args, **kwargs: P.kwargs) -> T: ...

    @overload
    def call(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T: ...

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``function`` on the reactor thread; wait for its result (or Deferred's)."""
        return blockingCallFromThread(reactor, function, *args, **kwargs)


class InfoProtocol(protocol.Protocol):
    """Answers any request with one JSON line about its own TLS connection, then closes cleanly."""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        # The pyOpenSSL Connection, or the WatchedConnection around it (which knows ``resumed``).
        handle: Any = ISystemHandle(self.transport).getHandle()
        body = json.dumps(
            {
                "resumed": bool(handle.resumed) if hasattr(handle, "resumed") else None,
                "protocol": handle.get_protocol_version_name(),
            }
        ).encode()
        self.transport.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + body + b"\n")
        self.transport.loseConnection()


@contextmanager
def tls_server(rt: ReactorThread, creator: Any, factory: protocol.Factory | None = None) -> Iterator[int]:
    """Listen on 127.0.0.1 with ``creator``; yield the port; stop listening afterwards."""
    factory = factory or protocol.Factory.forProtocol(InfoProtocol)
    port = rt.call(reactor.listenSSL, 0, factory, creator, interface="127.0.0.1")
    try:
        yield port.getHost().port
    finally:
        rt.call(port.stopListening)


def s_client(
    port: int,
    *,
    tls: str = "1.2",
    sess_in: Path | None = None,
    sess_out: Path | None = None,
    servername: str | None = None,
    extra: tuple[str, ...] = (),
) -> str:
    """One ``openssl s_client`` request; returns ``"New"`` or ``"Reused"``.

    ``-ign_eof`` and a request that gets an answer make sure a TLS 1.3 ticket
    has arrived before ``-sess_out`` writes the session (design.md, fact 5).
    """
    command = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", f"-tls{tls.replace('.', '_')}", "-ign_eof"]
    if sess_in is not None:
        command += ["-sess_in", str(sess_in)]
    if sess_out is not None:
        command += ["-sess_out", str(sess_out)]
    if servername is not None:
        command += ["-servername", servername]
    command += list(extra)
    done = subprocess.run(
        command,
        input=b"GET / HTTP/1.0\r\n\r\n",
        capture_output=True,
        timeout=PEER_TIMEOUT,
        check=False,
    )
    match = re.search(rb"^(New|Reused), ", done.stdout, re.MULTILINE)
    if not match:
        raise AssertionError(f"s_client got no handshake: {done.stdout[-800:]!r} {done.stderr[-800:]!r}")
    return match.group(1).decode()


def resume_series(port: int, tmp: Path, count: int, tls: str = "1.2", **kwargs: Any) -> list[str]:
    """``count`` s_client connections, each offering the session the previous one saved."""
    session = tmp / f"session-{port}-{tls}.pem"
    session.unlink(missing_ok=True)
    results = []
    for _ in range(count):
        results.append(
            s_client(port, tls=tls, sess_in=session if session.exists() else None, sess_out=session, **kwargs)
        )
    return results


REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisProcess:
    """A throwaway redis-server on a loopback port; stop() and start() model an outage."""

    def __init__(self, directory: Path, *extra: str, port: int | None = None) -> None:
        self.directory = directory
        self.port = free_port() if port is None else port
        self.extra = extra  # more redis-server arguments, e.g. "--enable-debug-command", "yes"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = spawn(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--daemonize", "no", "--protected-mode", "yes", *self.extra],
        )  # fmt: skip
        wait_for_port(self.port, self.process)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            stop(self.process, timeout=10)
            self.process = None

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets and answers nothing (a stall)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def command(self, *args: str) -> str:
        """A redis-cli-free command: RESP over a socket, for assertions and corruption."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
            payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode('latin-1'))}\r\n{a}\r\n" for a in args)
            conn.sendall(payload.encode("latin-1"))
            return conn.recv(1 << 20).decode("latin-1")


@contextmanager
def s_server(files: TLSFiles, tls: str, *extra: str) -> Iterator[int]:
    """``openssl s_server -www`` on a free loopback port, stopped afterwards."""
    port = free_port()
    command = [
        OPENSSL, "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(files.certificate),
        "-key", str(files.private_key), "-www", "-quiet", f"-tls{tls.replace('.', '_')}", *extra,
    ]
    with started(command, port):
        yield port

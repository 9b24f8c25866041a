"""Raw-socket peers for the hello tests: real hellos reshaped, sent over loopback, answers read.

Shared by tests/test_hello_limits.py and tests/fuzz_hello.py. A raw socket is
the only client that can send what real clients never do (one-byte records,
oversized record headers, a hello in pieces with bytes after it).
"""

from __future__ import annotations

from collections.abc import Callable

import gc
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, globalLogPublisher
from zope.interface import implementer

from twisted_sesscache.stores.memory import MemoryStore

RECORD_HEADER = 5
TLS12_RECORD = b"\x16\x03\x01"


def record(payload: bytes, content_type: int = 22, version: int = 0x0301) -> bytes:
    return bytes([content_type]) + version.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload


def first_message(stream: bytes) -> bytes:
    """The first handshake message (the ClientHello) out of the records a client sent."""
    payload, pos = b"", 0
    while pos + RECORD_HEADER <= len(stream) and stream[pos] == 22:
        length = int.from_bytes(stream[pos + 3 : pos + 5], "big")
        payload += stream[pos + RECORD_HEADER : pos + RECORD_HEADER + length]
        pos += RECORD_HEADER + length
    need = 4 + int.from_bytes(payload[1:4], "big")
    assert payload[:1] == b"\x01" and len(payload) >= need, "not a complete ClientHello"
    return payload[:need]


def grow(message: bytes, size: int, ext_type: int = 0x7A7A) -> bytes:
    """``message`` (a ClientHello without PSK) with an ignored extension padding it to ``size`` bytes."""
    body = message[4:]
    pos = 2 + 32
    pos += 1 + body[pos]  # session_id
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher_suites
    pos += 1 + body[pos]  # compression_methods
    exts = body[pos + 2 :]
    pad = size - len(message) - 4
    assert pad >= 0, "the hello is already larger"
    exts += ext_type.to_bytes(2, "big") + pad.to_bytes(2, "big") + bytes(pad)
    body = body[:pos] + len(exts).to_bytes(2, "big") + exts
    return b"\x01" + len(body).to_bytes(3, "big") + body


def fragment(message: bytes, size: int) -> list[bytes]:
    """``message`` cut into handshake records of ``size`` payload bytes each."""
    return [record(message[i : i + size]) for i in range(0, len(message), size)]


def connect(port: int, timeout: float = 10) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _read(conn: socket.socket, timeout: float, enough: Callable[[bytes], bool], waiting_for: str) -> bytes:
    """What the server sends until ``enough`` says so, or it closes (or resets), within ``timeout`` seconds."""
    received = b""
    deadline = time.monotonic() + timeout
    while not enough(received):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{waiting_for} within {timeout} s: {received[:64]!r}")
        conn.settimeout(left)
        try:
            chunk = conn.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    return received


def read_until_closed(conn: socket.socket, timeout: float = 10, limit: int = 1 << 20) -> bytes:
    """Everything the server sends until it closes (or resets), within ``timeout`` seconds."""
    return _read(conn, timeout, lambda received: len(received) >= limit, "the server neither answered nor closed")


def read_records(conn: socket.socket, timeout: float = 10) -> bytes:
    """Read until at least one whole record has arrived (or the server closes)."""

    def whole_record(received: bytes) -> bool:
        return len(received) >= RECORD_HEADER + int.from_bytes(received[3:5], "big") if len(received) >= RECORD_HEADER else False

    return _read(conn, timeout, whole_record, "no whole record")


def alerts(stream: bytes) -> list[int]:
    """The alert descriptions in the plaintext alert records of ``stream``."""
    found, pos = [], 0
    while pos + RECORD_HEADER <= len(stream):
        length = int.from_bytes(stream[pos + 3 : pos + 5], "big")
        if stream[pos] == 21 and length == 2 and pos + 7 <= len(stream):
            found.append(stream[pos + 6])
        pos += RECORD_HEADER + length
    return found


class CountingStore(MemoryStore):
    """A memory store that counts lookups and may answer them late, like a distant Redis."""

    answers_at_once = False  # like Redis: the server reads the hello and prefetches

    def __init__(self, latency: float = 0.0) -> None:
        super().__init__()
        self.latency = latency
        self.gets = 0

    def get(self, key: bytes, timeout: float | None = None) -> Deferred[bytes | None]:
        self.gets += 1
        answer = super().get(key, timeout)
        if not self.latency:
            return answer
        late: Deferred[bytes | None] = Deferred()
        call = reactor.callLater(self.latency, answer.chainDeferred, late)

        def cancelled(failure: Any) -> Any:
            # A caller's timeout cancels the lookup: the late answer is dropped.
            if call.active():
                call.cancel()
            return failure

        return late.addErrback(cancelled)


@implementer(ILogObserver)
@dataclass
class FailureLog:
    """Every error event twisted.logger saw while it listened."""

    events: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            self.events.append(event)

    def describe(self) -> list[str]:
        out = []
        for event in self.events:
            failure = event.get("log_failure")
            text = str(event.get("log_format") or event.get("format") or "")
            out.append(f"{text}: {failure.getTraceback() if failure is not None else event}"[:2000])
        return out


@contextmanager
def failures_logged() -> Iterator[FailureLog]:
    """Collect error events; garbage-collect first and last, which is when Deferreds report unhandled errors."""
    gc.collect()
    log = FailureLog()
    globalLogPublisher.addObserver(log)
    try:
        yield log
    finally:
        gc.collect()
        globalLogPublisher.removeObserver(log)

"""Fuzz the held-hello path: generated and mutated ClientHellos against a running server.

Real hellos (``openssl s_client``, fresh and resuming, TLS 1.2 and 1.3) and
built ones (several PSK identities, SSL 2.0 style) are mutated, re-cut into
records, followed by junk, sent in segments, and dropped with FIN or RST, many
connections at a time, to a Twisted server on loopback. Afterwards: no error
event logged, no connection left open, no peer left hanging, and a real client
still resumes.

Quick mode (10,000 cases) runs in ``make test`` (tests/test_hello_limits.py).
Longer runs: ``SESSCACHE_FUZZ_CASES=200000 make test`` or, standing alone,
``.venv/shared/bin/python -m tests.fuzz_hello --cases 200000 [--seed N] [--store]``.
"""

from __future__ import annotations

import argparse
import os
import random
import selectors
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.hello_peers import RECORD_HEADER, alerts, first_message, record
from tests.support import s_client
from tests.test_clienthello import Spec, capture_openssl_hello, sslv2_hello

QUICK_CASES = 10_000
CASE_TIMEOUT = 10.0  # a peer still waiting this long after its last byte counts as hung
IN_FLIGHT = 24
LOOKUP_LATENCY = 0.01  # a store this slow leaves time for late segments and early closes

Mutator = Callable[[random.Random, bytearray, Sequence[bytes]], None]


# --- The corpus ------------------------------------------------------------------


def corpus(port: int, workdir: Path) -> list[bytes]:
    """ClientHello messages (handshake layer, no records) to start cases from."""
    messages = []
    for tls in ("1.2", "1.3"):
        flag = f"-tls{tls.replace('.', '_')}"
        session = workdir / f"fuzz-{tls}.pem"
        s_client(port, tls=tls, sess_out=session)
        messages.append(first_message(capture_openssl_hello(flag)))
        messages.append(first_message(capture_openssl_hello(flag, "-sess_in", str(session))))
    messages.append(
        Spec(
            session_id=os.urandom(32),
            server_name="fuzz.test",
            supported_versions=(0x0304, 0x0303),
            ticket=os.urandom(100),
            psks=tuple((os.urandom(n), 7, os.urandom(32)) for n in (32, 20, 48)),
        ).message()
    )
    return messages


# --- Mutations ---------------------------------------------------------------------


def _flip(rng: random.Random, buf: bytearray, _: Sequence[bytes]) -> None:
    if buf:
        buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)


def _insert(rng: random.Random, buf: bytearray, _: Sequence[bytes]) -> None:
    at = rng.randrange(len(buf) + 1)
    buf[at:at] = rng.randbytes(rng.randint(1, 8))


def _delete(rng: random.Random, buf: bytearray, _: Sequence[bytes]) -> None:
    if buf:
        at = rng.randrange(len(buf))
        del buf[at : at + rng.randint(1, 8)]


def _length(rng: random.Random, buf: bytearray, _: Sequence[bytes]) -> None:
    """Overwrite what may be a length field with a boundary value."""
    if len(buf) >= 2:
        at = rng.randrange(len(buf) - 1)
        value = rng.choice([0, 1, 0xFFFF, 0x7FFF, len(buf) - at, len(buf) - at - 2, rng.randrange(0x10000)])
        buf[at : at + 2] = (value & 0xFFFF).to_bytes(2, "big")


def _truncate(rng: random.Random, buf: bytearray, _: Sequence[bytes]) -> None:
    if buf:
        del buf[rng.randrange(len(buf)) :]


def _splice(rng: random.Random, buf: bytearray, others: Sequence[bytes]) -> None:
    other = rng.choice(others)
    cut = rng.randrange(len(buf) + 1)
    buf[cut:] = other[rng.randrange(len(other) + 1) :]


def _grow(rng: random.Random, buf: bytearray, _: Sequence[bytes]) -> None:
    """Claim a larger body, up to and past what the server is willing to hold."""
    if len(buf) >= 4:
        size = rng.choice([len(buf) - 4 + rng.randint(1, 64), 0xFFFF, 64 * 1024 - 9, rng.randrange(1 << 24)])
        buf[1:4] = size.to_bytes(3, "big")


MUTATORS: list[Mutator] = [_flip, _insert, _delete, _length, _truncate, _splice, _grow]


def records_of(rng: random.Random, message: bytes) -> bytearray:
    """``message`` cut into handshake records: whole, tiny, random, or with a lying header."""
    style = rng.randrange(6)
    if style == 0 or not message:
        sizes = [max(1, len(message))]
    elif style == 1:
        sizes = [1] * len(message)
    elif style == 2:
        sizes = [rng.randint(1, 300) for _ in range(len(message))]
    else:
        sizes = [rng.randint(1, max(1, len(message)))]
    out, pos = bytearray(), 0
    for size in sizes:
        if pos >= len(message):
            break
        out += record(message[pos : pos + size], version=rng.choice([0x0301, 0x0301, 0x0303, 0x0300]))
        pos += size
    if style == 4:  # one record header announcing more than plaintext allows
        at = rng.randrange(0, len(out) - RECORD_HEADER + 1) if len(out) > RECORD_HEADER else 0
        out[at : at + RECORD_HEADER] = b"\x16\x03\x01" + rng.randint(2**14 + 1, 0xFFFF).to_bytes(2, "big")
    return out


def trailer(rng: random.Random) -> bytes:
    """What may follow the hello: nothing, a CCS, application data, an alert, noise."""
    return rng.choice(
        [
            b"",
            b"",
            record(b"\x01", 20, 0x0303),
            record(rng.randbytes(rng.randint(1, 64)), 23, 0x0303),
            record(b"\x02\x28", 21, 0x0303),
            rng.randbytes(rng.randint(1, 40)),
        ]
    )


def make_case(rng: random.Random, messages: Sequence[bytes]) -> tuple[bytes, int]:
    """One stream a client might send first, and where its trailer starts."""
    kind = rng.random()
    if kind < 0.05:
        junk = rng.randbytes(rng.randint(1, 600))
        return junk, len(junk)
    if kind < 0.08:
        hello = sslv2_hello(0x0301, rng.randbytes(3 * rng.randint(0, 12)), rng.randbytes(rng.choice([0, 16, 33])),
                           rng.randbytes(rng.randint(14, 34)))  # fmt: skip
        return hello + trailer(rng), len(hello)
    message = bytearray(rng.choice(messages))
    mutate_message = rng.random() < 0.8
    if mutate_message:
        for _ in range(rng.randint(1, 4)):
            rng.choice(MUTATORS)(rng, message, messages)
    stream = records_of(rng, bytes(message))
    if not mutate_message or rng.random() < 0.2:
        rng.choice(MUTATORS)(rng, stream, [bytes(stream)])  # the record layer too
    return (bytes(stream) or b"\x16") + trailer(rng), max(1, len(stream))


# --- Delivery ----------------------------------------------------------------------


@dataclass
class Peer:
    """One case in flight: what is left to send (and when), and what came back."""

    conn: socket.socket
    pieces: list[tuple[float, bytes]]
    rst: bool
    close_at: float  # when to half-close (or reset): sometimes only after the server has had its say
    received: bytearray = field(default_factory=bytearray)
    deadline: float = 0.0


def _start(port: int, rng: random.Random, stream: bytes, hello_end: int, now: float) -> Peer:
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.setblocking(False)
    cuts = set(rng.sample(range(1, len(stream)), min(max(0, len(stream) - 1), rng.choice([0, 0, 1, 2, 5]))))
    if 0 < hello_end < len(stream) and rng.random() < 0.5:
        cuts.add(hello_end)  # the trailer in a segment of its own, while the hello's lookup runs
    bounds = [0, *sorted(cuts), len(stream)]
    delay = rng.choice([0.0, 0.0, 0.001, 0.005])
    pieces = [(now + i * delay, stream[a:b]) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    close_at = pieces[-1][0] + rng.choice([0.0, 0.0, 0.0, 0.03])
    return Peer(conn, pieces, rst=rng.random() < 0.3, close_at=close_at)


def _send_due(peer: Peer, now: float) -> bool:
    """Send the pieces that are due; True once all are sent (and the peer has closed its side)."""
    while peer.pieces and peer.pieces[0][0] <= now:
        _, data = peer.pieces.pop(0)
        try:
            _send_all(peer.conn, data)
        except OSError:
            peer.pieces.clear()  # the server already closed: fine
    if peer.pieces or now < peer.close_at:
        return False
    if peer.rst:
        peer.conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    else:
        try:
            peer.conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    peer.deadline = now + CASE_TIMEOUT
    return True


def _send_all(conn: socket.socket, data: bytes) -> None:
    conn.settimeout(5)
    try:
        conn.sendall(data)
    finally:
        conn.setblocking(False)


@dataclass
class Outcome:
    cases: int = 0
    seconds: float = 0.0
    answers: Counter[str] = field(default_factory=Counter)
    hung: list[bytes] = field(default_factory=list)


def _classify(received: bytes) -> str:
    if not received:
        return "closed"
    if alerts(received):
        return "alert"
    return "server-hello" if received[:1] == b"\x16" else "other"


def run(port: int, messages: Sequence[bytes], cases: int, seed: int) -> Outcome:
    """Send ``cases`` cases, ``IN_FLIGHT`` at a time; every peer ends (answered, closed, or timed out)."""
    rng = random.Random(seed)
    outcome = Outcome()
    started = time.monotonic()
    waiting: dict[socket.socket, tuple[Peer, bytes]] = {}
    sending: list[tuple[Peer, bytes]] = []
    made = 0
    with selectors.DefaultSelector() as selector:
        while made < cases or waiting or sending:
            now = time.monotonic()
            while made < cases and len(waiting) + len(sending) < IN_FLIGHT:
                stream, hello_end = make_case(rng, messages)
                sending.append((_start(port, rng, stream, hello_end, now), stream))
                made += 1
            for peer, stream in list(sending):
                if _send_due(peer, now):
                    sending.remove((peer, stream))
                    if peer.rst:
                        peer.conn.close()
                        outcome.answers["reset-by-client"] += 1
                    else:
                        waiting[peer.conn] = (peer, stream)
                        selector.register(peer.conn, selectors.EVENT_READ)
            for key, _ in selector.select(0.001 if sending else 0.05):
                peer, stream = waiting[key.fileobj]  # type: ignore[index]
                try:
                    chunk = peer.conn.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    peer.received += chunk
                    continue
                selector.unregister(peer.conn)
                del waiting[peer.conn]
                peer.conn.close()
                outcome.answers[_classify(bytes(peer.received))] += 1
            for conn, (peer, stream) in list(waiting.items()):
                if time.monotonic() > peer.deadline:
                    selector.unregister(conn)
                    del waiting[conn]
                    conn.close()
                    outcome.hung.append(stream)
    outcome.cases = made
    outcome.seconds = time.monotonic() - started
    return outcome


def resumes(port: int, workdir: Path, tls: str) -> bool:
    """A real client still resumes: a new session saved, then offered."""
    session = workdir / f"after-{tls}.pem"
    s_client(port, tls=tls, sess_out=session)
    time.sleep(0.05)  # a store write is asynchronous
    return s_client(port, tls=tls, sess_in=session) == "Reused"


def cases_wanted() -> int:
    return int(os.environ.get("SESSCACHE_FUZZ_CASES", QUICK_CASES))


# --- Standing alone ----------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from tests.hello_peers import CountingStore, failures_logged
    from tests.support import ReactorThread, make_tls_files, tls_server
    from twisted_sesscache import RUNTIME, SessionCache
    from twisted_sesscache.certs import certificate_options

    parser = argparse.ArgumentParser(prog="python -m tests.fuzz_hello", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=cases_wanted())
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "big"))
    parser.add_argument("--store", action="store_true", help="an external store with 10 ms lookups (shared runtime)")
    args = parser.parse_args(argv)
    if args.cases <= 0:
        print("--cases: must be a positive number of cases", file=sys.stderr)
        return 1
    if args.store and not RUNTIME.shared:
        print("--store: the server-side external store needs the shared-OpenSSL runtime", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="fuzz-hello-"))
    files = make_tls_files(workdir)
    rt = ReactorThread()
    rt.start()
    try:
        kwargs = {"store": CountingStore(latency=LOOKUP_LATENCY), "store_keys": [bytes(32)], "store_timeout": 2.0} if args.store else {}
        cache = SessionCache(**kwargs)  # type: ignore[arg-type]
        options = certificate_options(files.certificate, files.private_key)
        with tls_server(rt, cache.server_context_factory(options)) as port, failures_logged() as log:
            outcome = run(port, corpus(port, workdir), args.cases, args.seed)
            resumed = [resumes(port, workdir, tls) for tls in ("1.2", "1.3")]
        print(f"seed {args.seed}: {outcome.cases} cases in {outcome.seconds:.1f} s, answers {dict(outcome.answers)}, "
              f"hung {len(outcome.hung)}, errors logged {len(log.events)}, resumed afterwards {resumed}")  # fmt: skip
        for line in log.describe()[:5]:
            print(line)
        return 0 if not log.events and not outcome.hung and all(resumed) else 1
    finally:
        rt.stop()


if __name__ == "__main__":
    raise SystemExit(main())

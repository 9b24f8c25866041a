"""Tests for twisted_sesscache.tls.clienthello: read exactly what the client sent, or refuse."""

from __future__ import annotations

import selectors
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from twisted_sesscache.tls.clienthello import (
    MAX_HELLO_BYTES,
    ClientHello,
    ClientHelloError,
    ClientHelloReader,
    parse_client_hello,
    peek_session_id,
)

SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

SNI, TICKET, PSK, VERSIONS = 0, 35, 41, 43
KNOWN = {SNI, TICKET, PSK, VERSIONS}


# --- Test-side builder ---------------------------------------------------------


def vec(data: bytes, size: int) -> bytes:
    return len(data).to_bytes(size, "big") + data


@dataclass
class Spec:
    """The fields of a ClientHello, as the builder writes them."""

    legacy_version: int = 0x0303
    random: bytes = bytes(32)
    session_id: bytes = b""
    cipher_suites: tuple[int, ...] = (0x1301, 0xC02F)
    compression: bytes = b"\x00"
    server_name: str | None = None
    supported_versions: tuple[int, ...] | None = None
    ticket: bytes | None = None  # None: no session_ticket extension
    psks: tuple[tuple[bytes, int, bytes], ...] = ()  # (identity, obfuscated age, binder)
    others: tuple[tuple[int, bytes], ...] = ()
    order: tuple[int, ...] | None = None  # permutation of the non-PSK extensions
    omit_extensions: bool = False  # no extensions block at all (pre-TLS 1.3 style)

    def extensions(self) -> list[tuple[int, bytes]]:
        exts: list[tuple[int, bytes]] = list(self.others)
        if self.server_name is not None:
            name = vec(self.server_name.encode("ascii"), 2)
            exts.append((SNI, vec(b"\x00" + name, 2)))
        if self.supported_versions is not None:
            exts.append((VERSIONS, vec(b"".join(v.to_bytes(2, "big") for v in self.supported_versions), 1)))
        if self.ticket is not None:
            exts.append((TICKET, self.ticket))
        if self.order is not None:
            exts = [exts[i] for i in self.order if i < len(exts)]
        if self.psks:
            ids = b"".join(vec(i, 2) + age.to_bytes(4, "big") for i, age, _ in self.psks)
            binders = b"".join(vec(b, 1) for _, _, b in self.psks)
            exts.append((PSK, vec(ids, 2) + vec(binders, 2)))
        return exts

    def body(self) -> bytes:
        out = (
            self.legacy_version.to_bytes(2, "big")
            + self.random
            + vec(self.session_id, 1)
            + vec(b"".join(s.to_bytes(2, "big") for s in self.cipher_suites), 2)
            + vec(self.compression, 1)
        )
        exts = self.extensions()
        if self.omit_extensions and not exts:
            return out
        return out + vec(b"".join(t.to_bytes(2, "big") + vec(d, 2) for t, d in exts), 2)

    def message(self) -> bytes:
        return handshake(1, self.body())

    def expected(self) -> ClientHello:
        return ClientHello(
            legacy_version=self.legacy_version,
            session_id=self.session_id,
            psk_identities=tuple(i for i, _, _ in self.psks),
            ticket=bool(self.ticket),
            server_name=self.server_name,
            supported_versions=self.supported_versions or (),
        )


def handshake(msg_type: int, body: bytes) -> bytes:
    return bytes([msg_type]) + vec(body, 3)


def record(payload: bytes, content_type: int = 22, version: int = 0x0301) -> bytes:
    return bytes([content_type]) + version.to_bytes(2, "big") + vec(payload, 2)


def wrap(msg: bytes, sizes: list[int], extra: bytes = b"") -> tuple[bytes, int]:
    """Fragment ``msg`` into handshake records; ``extra`` shares the last record.

    Returns the stream and the offset just past the hello's last byte.
    """
    out = bytearray()
    pos = 0
    for size in sizes:
        if pos >= len(msg):
            break
        out += record(msg[pos : pos + size])
        pos += size
    if pos < len(msg):
        out += record(msg[pos:])
    hello_end = len(out)
    if extra:
        header_at = _last_record_start(bytes(out))
        length = int.from_bytes(out[header_at + 3 : header_at + 5], "big") + len(extra)
        if length <= 2**14:
            out[header_at + 3 : header_at + 5] = length.to_bytes(2, "big")
            out += extra
    return bytes(out), hello_end


def _last_record_start(stream: bytes) -> int:
    pos = start = 0
    while pos < len(stream):
        start = pos
        pos += 5 + int.from_bytes(stream[pos + 3 : pos + 5], "big")
    return start


def sslv2_hello(version: int, specs: bytes, session_id: bytes, challenge: bytes) -> bytes:
    body = (
        b"\x01"
        + version.to_bytes(2, "big")
        + len(specs).to_bytes(2, "big")
        + len(session_id).to_bytes(2, "big")
        + len(challenge).to_bytes(2, "big")
        + specs
        + session_id
        + challenge
    )
    return (0x8000 | len(body)).to_bytes(2, "big") + body


# --- Strategies -----------------------------------------------------------------

u16 = st.integers(0, 0xFFFF)
labels = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=20)
host_names = st.lists(labels, min_size=1, max_size=4).map(".".join)
psk_entries = st.tuples(
    st.binary(min_size=1, max_size=80), st.integers(0, 2**32 - 1), st.binary(min_size=32, max_size=64)
)


@st.composite
def specs(draw: st.DrawFn, tls13: bool = False) -> Spec:
    others = draw(
        st.dictionaries(u16.filter(lambda t: t not in KNOWN), st.binary(max_size=60), max_size=5)
    )
    versions = draw(st.none() | st.lists(u16, min_size=1, max_size=8).map(tuple))
    psks = draw(st.lists(psk_entries, min_size=2 if tls13 else 0, max_size=4).map(tuple))
    if tls13:
        versions = (0x0304, *(versions or ()))
    spec = Spec(
        legacy_version=draw(st.sampled_from([0x0300, 0x0301, 0x0302, 0x0303])),
        random=draw(st.binary(min_size=32, max_size=32)),
        session_id=draw(st.binary(max_size=32)),
        cipher_suites=tuple(draw(st.lists(u16, min_size=1, max_size=20))),
        compression=draw(st.binary(min_size=1, max_size=3)),
        server_name=draw(st.none() | host_names),
        supported_versions=versions,
        ticket=draw(st.none() | st.binary(max_size=200)),
        psks=psks,
        others=tuple(others.items()),
        omit_extensions=draw(st.booleans()),
    )
    n = len(spec.extensions()) - bool(psks)
    spec.order = tuple(draw(st.permutations(range(n))))
    return spec


@st.composite
def fragment_sizes(draw: st.DrawFn, total: int) -> list[int]:
    """Record payload sizes covering ``total`` bytes: tiny, random or whole."""
    style = draw(st.sampled_from(["whole", "tiny", "random"]))
    if style == "whole":
        return [total]
    if style == "tiny":
        return draw(st.lists(st.integers(1, 4), min_size=total, max_size=total))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, total - 1)), max_size=12)))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total]) if b > a]


def chunk_points(draw: Callable[[st.SearchStrategy[set[int]]], set[int]], length: int) -> list[int]:
    return sorted(draw(st.sets(st.integers(0, length), max_size=25)))


def outcome(data: bytes) -> ClientHello | None | type[ClientHelloError]:
    """parse_client_hello's answer, with the one exception allowed as a value."""
    try:
        return parse_client_hello(data)
    except ClientHelloError:
        return ClientHelloError


def assert_consistent(stream: bytes, points: list[int]) -> None:
    """Answers for growing prefixes: None..., then one fixed answer for good."""
    final = None
    for k in sorted(set(points)):
        got = outcome(stream[:k])
        if got is None:
            assert final is None, f"prefix {k} went back to None after {final!r}"
            assert k < MAX_HELLO_BYTES
        elif final is None:
            final = got
        else:
            assert got == final, f"prefix {k}: {got!r} != {final!r}"


# --- Round trips ----------------------------------------------------------------


@SETTINGS
@given(spec=specs(), data=st.data())
def test_fragmented_hello_round_trips(spec: Spec, data: st.DataObject) -> None:
    msg = spec.message()
    sizes = data.draw(fragment_sizes(len(msg)))
    extra = data.draw(st.binary(max_size=20))  # more handshake bytes in the last record
    stream, hello_end = wrap(msg, sizes, extra)
    stream += data.draw(st.sampled_from([b"", record(b"app data", 23), b"\x15\x03", b"\xff" * 7]))
    expected = spec.expected()

    assert parse_client_hello(stream) == expected
    assert parse_client_hello(stream[:hello_end]) == expected
    assert parse_client_hello(stream[: hello_end - 1]) is None
    for k in [*range(min(hello_end, 12)), *chunk_points(data.draw, len(stream))]:
        assert parse_client_hello(stream[:k]) == (expected if k >= hello_end else None), k


@SETTINGS
@given(spec=specs(), data=st.data())
def test_a_peek_at_the_session_id_is_the_parsed_one_or_none(spec: Spec, data: st.DataObject) -> None:
    """The look at a fixed place never names another session than the whole hello does."""
    msg = spec.message()
    sizes = data.draw(fragment_sizes(len(msg)))
    stream, _ = wrap(msg, sizes)
    peeked = peek_session_id(stream[: data.draw(st.integers(0, len(stream)))])
    assert peeked is None or peeked == spec.session_id
    if sizes[0] >= 4 + 2 + 32 + 1 + len(spec.session_id) and spec.session_id:
        assert peek_session_id(stream) == spec.session_id  # the usual case: one record holds it


def test_a_peek_answers_none_for_what_is_not_a_plain_hello() -> None:
    session_id = bytes(range(32))
    body = b"\x03\x03" + bytes(32) + bytes([32]) + session_id + b"\x00\x02\x13\x01\x01\x00"
    hello = record(handshake(1, body))
    assert peek_session_id(hello) == session_id
    assert peek_session_id(hello[:-len(body) + 34 + 16]) is None  # the ID cut short
    assert peek_session_id(record(handshake(1, b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01\x01\x00"))) is None
    assert peek_session_id(record(handshake(2, body))) is None  # not a ClientHello
    assert peek_session_id(record(handshake(1, body), content_type=23)) is None
    assert peek_session_id(sslv2_hello(0x0303, b"\x00\x00\x2f", session_id[:16], bytes(16))) is None


@SETTINGS
@given(spec=specs(tls13=True), data=st.data())
def test_tls13_hello_with_several_psk_identities(spec: Spec, data: st.DataObject) -> None:
    msg = spec.message()
    stream, hello_end = wrap(msg, data.draw(fragment_sizes(len(msg))))
    hello = parse_client_hello(stream)
    assert hello == spec.expected()
    assert hello is not None and len(hello.psk_identities) >= 2 and hello.offers_session
    assert 0x0304 in hello.supported_versions
    # Accumulating TCP segments with arbitrary boundaries.
    received = bytearray()
    for cut in [*chunk_points(data.draw, len(stream)), len(stream)]:
        received += stream[len(received) : cut]
        assert parse_client_hello(bytes(received)) == (hello if cut >= hello_end else None)


@SETTINGS
@given(
    version=st.sampled_from([0x0300, 0x0301, 0x0302, 0x0303]),
    specs_=st.lists(st.binary(min_size=3, max_size=3), min_size=1, max_size=40).map(b"".join),
    session_id=st.sampled_from([b"", bytes(range(16))]),
    challenge=st.integers(16, 32).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    trailer=st.binary(max_size=10),
)
def test_sslv2_compatible_hello(
    version: int, specs_: bytes, session_id: bytes, challenge: bytes, trailer: bytes
) -> None:
    hello_bytes = sslv2_hello(version, specs_, session_id, challenge)
    expected = ClientHello(version, session_id, (), False, None, (), sslv2_compatible=True)
    for k in range(len(hello_bytes)):
        assert parse_client_hello(hello_bytes[:k]) is None
    assert parse_client_hello(hello_bytes + trailer) == expected
    assert expected.offers_session == bool(session_id)


def test_minimal_and_extensionless_hellos() -> None:
    plain = Spec(omit_extensions=True)
    assert parse_client_hello(record(plain.message())) == ClientHello(0x0303, b"", (), False, None, ())
    empty_block = Spec()  # an extensions block of length zero
    assert parse_client_hello(record(empty_block.message())) == plain.expected()
    assert not plain.expected().offers_session
    assert Spec(ticket=b"").expected().ticket is False
    assert parse_client_hello(record(Spec(ticket=b"").message())) == plain.expected()
    assert parse_client_hello(record(Spec(ticket=b"t").message())).ticket is True  # type: ignore[union-attr]


def test_every_prefix_of_a_full_hello() -> None:
    spec = Spec(
        session_id=bytes(range(32)),
        server_name="xn--bcher-kva.example",
        supported_versions=(0x0304, 0x0303),
        ticket=b"ticket",
        psks=((b"id-one", 7, bytes(32)), (b"id-two", 9, bytes(48))),
        others=((10, b"\x00\x02\x00\x1d"), (51, b"\x00" * 40)),
    )
    stream, hello_end = wrap(spec.message(), [1, 2, 3, 50, 7])
    for k in range(hello_end):
        assert parse_client_hello(stream[:k]) is None, k
    assert parse_client_hello(stream) == spec.expected()
    assert parse_client_hello(bytearray(stream)) == spec.expected()
    assert parse_client_hello(memoryview(stream)) == spec.expected()


# --- Malformed input --------------------------------------------------------------


def _rejects(msg: bytes) -> None:
    with pytest.raises(ClientHelloError):
        parse_client_hello(record(msg))


def _with_exts(exts: list[tuple[int, bytes]]) -> bytes:
    base = Spec(omit_extensions=True).body()
    return handshake(1, base + vec(b"".join(t.to_bytes(2, "big") + vec(d, 2) for t, d in exts), 2))


PSK_BODY = vec(vec(b"id", 2) + bytes(4), 2) + vec(vec(bytes(32), 1), 2)


@pytest.mark.parametrize(
    "msg",
    [
        pytest.param(handshake(2, Spec().body()), id="not-a-client-hello"),
        pytest.param(Spec(session_id=bytes(33)).message(), id="session-id-33"),
        pytest.param(Spec(legacy_version=0x0202).message(), id="legacy-version-not-tls"),
        pytest.param(Spec(cipher_suites=()).message(), id="no-cipher-suites"),
        pytest.param(Spec(compression=b"").message(), id="no-compression"),
        pytest.param(handshake(1, Spec().body() + b"\x00"), id="trailing-after-extensions"),
        pytest.param(handshake(1, Spec(omit_extensions=True).body() + b"\x00"), id="one-stray-byte"),
        pytest.param(_with_exts([(5, b""), (5, b"")]), id="duplicate-extension"),
        pytest.param(_with_exts([(PSK, PSK_BODY), (5, b"")]), id="psk-not-last"),
        pytest.param(_with_exts([(PSK, PSK_BODY + b"\x00")]), id="psk-trailing"),
        pytest.param(
            _with_exts([(PSK, vec(vec(b"id", 2) + bytes(4), 2) + vec(b"", 2))]), id="psk-no-binder"
        ),
        pytest.param(
            _with_exts([(PSK, vec(vec(b"id", 2) + bytes(4), 2) + vec(vec(bytes(31), 1), 2))]),
            id="psk-short-binder",
        ),
        pytest.param(_with_exts([(PSK, vec(vec(b"", 2) + bytes(4), 2) + vec(vec(bytes(32), 1), 2))]), id="psk-empty-identity"),
        pytest.param(_with_exts([(SNI, vec(b"\x00" + vec("bücher".encode(), 2), 2))]), id="sni-non-ascii"),
        pytest.param(_with_exts([(SNI, vec(b"\x00" + vec(b"a\x00b", 2), 2))]), id="sni-nul"),
        pytest.param(_with_exts([(SNI, vec(b"\x00" + vec(b"", 2), 2))]), id="sni-empty-name"),
        pytest.param(_with_exts([(SNI, b"")]), id="sni-empty-extension"),
        pytest.param(_with_exts([(SNI, vec(b"\x00" + vec(b"a", 2), 2) + b"x")]), id="sni-trailing"),
        pytest.param(_with_exts([(SNI, vec(b"\x00" + vec(b"a", 2) + b"\x00" + vec(b"b", 2), 2))]), id="sni-two-names"),
        pytest.param(_with_exts([(SNI, vec(b"\x01" + vec(b"a", 2), 2))]), id="sni-unknown-type"),
        pytest.param(_with_exts([(VERSIONS, vec(b"\x03", 1))]), id="versions-odd"),
        pytest.param(_with_exts([(VERSIONS, vec(b"", 1))]), id="versions-empty"),
        pytest.param(_with_exts([(VERSIONS, vec(b"\x03\x04", 1) + b"\x00")]), id="versions-trailing"),
        pytest.param(
            handshake(1, Spec(omit_extensions=True).body() + vec(b"\x00\x05\x00\x0aabc", 2)),
            id="extension-overruns-block",
        ),
        pytest.param(
            handshake(1, Spec(omit_extensions=True).body() + b"\x00\x01\x00"), id="extensions-overrun-body"
        ),
    ],
)
def test_malformed_hellos_are_rejected(msg: bytes) -> None:
    _rejects(msg)


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(record(Spec().message(), content_type=23), id="application-data-first"),
        pytest.param(b"\x15\x03\x01\x00\x02\x02\x28", id="alert-first"),
        pytest.param(b"GET / HTTP/1.1\r\n", id="http"),
        pytest.param(b"\x16\x02", id="record-version-not-tls"),
        pytest.param(b"\x16\x03\x01\x00\x00", id="empty-record"),
        pytest.param(b"\x16\x03\x01" + (2**14 + 2049).to_bytes(2, "big"), id="record-too-long"),
        pytest.param(
            record(Spec().message()[:10]) + record(b"\x01", 20) + record(Spec().message()[10:]),
            id="change-cipher-spec-inside-hello",
        ),
        pytest.param(b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", id="hello-longer-than-bound"),
        pytest.param(b"\x80\x03\x02\x03\x03", id="sslv2-not-client-hello"),
        pytest.param(sslv2_hello(0x0002, b"abc", b"", bytes(16)), id="sslv2-pure-v2"),
        pytest.param(sslv2_hello(0x0301, b"ab", b"", bytes(16)), id="sslv2-specs-not-triples"),
        pytest.param(sslv2_hello(0x0301, b"", b"", bytes(16)), id="sslv2-no-specs"),
        pytest.param(sslv2_hello(0x0301, b"abc", b"", bytes(15)), id="sslv2-short-challenge"),
        pytest.param(sslv2_hello(0x0301, b"abc", bytes(33), bytes(16)), id="sslv2-long-session-id"),
        pytest.param(
            (0x8000 | 29).to_bytes(2, "big") + sslv2_hello(0x0301, b"abc", b"", bytes(16))[2:] + b"x",
            id="sslv2-trailing-byte",
        ),
    ],
)
def test_malformed_streams_are_rejected(stream: bytes) -> None:
    with pytest.raises(ClientHelloError):
        parse_client_hello(stream)


def test_records_after_the_hello_are_ignored() -> None:
    msg = Spec(server_name="a.example").message()
    stream = record(msg) + record(b"\x01", 20) + b"\x17\x03\x03\xff\xff" + b"junk"
    assert parse_client_hello(stream) == Spec(server_name="a.example").expected()
    assert parse_client_hello(record(msg + handshake(99, b"x" * 10))) is not None


# --- Bounded buffering ------------------------------------------------------------


def test_unfinished_hello_is_refused_past_the_bound() -> None:
    """A peer that trickles a plausible hello forever must not be buffered forever."""
    suites = (MAX_HELLO_BYTES - 600) & ~1
    body_len = 2 + 32 + 1 + 2 + suites + 2  # fits the bound on its own...
    head = (0x0303).to_bytes(2, "big") + bytes(32) + b"\x00" + suites.to_bytes(2, "big")
    msg = b"\x01" + body_len.to_bytes(3, "big") + head + b"\x13\x01" * (suites // 2) + b"\x01\x00"
    # ...but not once split into 100-byte records: record headers push it past.
    stream = b"".join(record(msg[i : i + 100]) for i in range(0, len(msg), 100))
    assert len(stream) > MAX_HELLO_BYTES
    for k in range(0, MAX_HELLO_BYTES, 1000):
        assert parse_client_hello(stream[:k]) is None
    assert parse_client_hello(stream[: MAX_HELLO_BYTES - 1]) is None
    for k in (MAX_HELLO_BYTES, MAX_HELLO_BYTES + 1, len(stream)):
        with pytest.raises(ClientHelloError):
            parse_client_hello(stream[:k])
    # The same hello in large records fits, and completes.
    big = b"".join(record(msg[i : i + 2**14]) for i in range(0, len(msg), 2**14))
    assert len(big) < MAX_HELLO_BYTES
    assert parse_client_hello(big) == ClientHello(0x0303, b"", (), False, None, ())


def test_complete_hello_followed_by_lots_of_data() -> None:
    msg = Spec(server_name="x.test").message()
    stream = record(msg) + bytes(2 * MAX_HELLO_BYTES)
    assert parse_client_hello(stream) == Spec(server_name="x.test").expected()


# --- Fuzzing: random and mutated input --------------------------------------------


def handshake_payload(stream: bytes) -> bytes:
    """The concatenated payloads of the leading handshake records."""
    out, pos = b"", 0
    while pos < len(stream) and stream[pos] == 22:
        out += stream[pos + 5 : pos + 5 + int.from_bytes(stream[pos + 3 : pos + 5], "big")]
        pos += 5 + int.from_bytes(stream[pos + 3 : pos + 5], "big")
    return out


def check_hello_invariants(hello: ClientHello, msg: bytes) -> None:
    """Every field returned must have been read from the message itself."""
    assert len(hello.session_id) <= 32 and hello.session_id in msg
    assert all(i and i in msg for i in hello.psk_identities)
    if hello.server_name is not None:
        assert hello.server_name and hello.server_name.encode("ascii") in msg
    assert all(v.to_bytes(2, "big") in msg for v in hello.supported_versions)
    assert hello.legacy_version >> 8 == 3


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "set16", "truncate"]))
        i = draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del buf[i : i + draw(st.integers(1, 4))]
        elif op == "set16" and len(buf) >= 2:
            value = draw(st.sampled_from([0, 1, 0xFFFF, len(buf) - i, len(buf) - i - 2]) | u16)
            buf[i : i + 2] = (value & 0xFFFF).to_bytes(2, "big")
        elif op == "truncate":
            del buf[i:]
    return bytes(buf)


@SETTINGS
@given(
    prefix=st.sampled_from([b"", b"\x16\x03\x01", b"\x16\x03\x01\x01\x00\x01\x00\x00\xfc\x03\x03", b"\x80"]),
    junk=st.binary(max_size=400),
)
def test_random_bytes_never_raise_anything_else(prefix: bytes, junk: bytes) -> None:
    got = outcome(prefix + junk)
    assert got is None or got is ClientHelloError or isinstance(got, ClientHello)


@SETTINGS
@given(spec=specs(), data=st.data())
def test_mutated_messages_are_read_exactly_or_refused(spec: Spec, data: st.DataObject) -> None:
    """Mutate the handshake message under a valid record layer."""
    msg = data.draw(mutated(spec.message()))
    assume(msg)
    stream, _ = wrap(msg, data.draw(fragment_sizes(len(msg))))
    got = outcome(stream)
    declared = 4 + int.from_bytes(msg[1:4], "big") if len(msg) >= 4 else None
    if isinstance(got, ClientHello):
        # Complete only if the message really holds all it claims.
        assert declared is not None and declared <= len(msg) and msg[0] == 1
        check_hello_invariants(got, msg[:declared])
        assert got == reference_parse(msg[:declared])
    elif declared is not None and declared <= len(msg) and msg[0] == 1:
        assert got is ClientHelloError
        with pytest.raises(Bad):
            reference_parse(msg[:declared])
    assert_consistent(stream, [0, *chunk_points(data.draw, len(stream)), len(stream)])


@SETTINGS
@given(spec=specs(), data=st.data())
def test_mutated_streams_never_raise_anything_else(spec: Spec, data: st.DataObject) -> None:
    """Mutate the whole stream, record headers included."""
    msg = spec.message()
    stream, _ = wrap(msg, data.draw(fragment_sizes(len(msg))))
    stream = data.draw(mutated(stream))
    got = outcome(stream)
    assert got is None or got is ClientHelloError or isinstance(got, ClientHello)
    if isinstance(got, ClientHello):
        check_hello_invariants(got, handshake_payload(stream))
    assert_consistent(stream, [0, *chunk_points(data.draw, len(stream)), len(stream)])


@SETTINGS
@given(
    specs_=st.binary(max_size=30),
    session_id=st.binary(max_size=40),
    challenge=st.binary(max_size=40),
    data=st.data(),
)
def test_mutated_sslv2_hellos(specs_: bytes, session_id: bytes, challenge: bytes, data: st.DataObject) -> None:
    stream = data.draw(mutated(sslv2_hello(0x0301, specs_, session_id, challenge)))
    got = outcome(stream)
    if isinstance(got, ClientHello):
        assert got.sslv2_compatible and got.session_id in stream and len(got.session_id) <= 32
    assert_consistent(stream, list(range(len(stream) + 1)))


# --- An independent, whole-message reference parser -------------------------------


class Bad(Exception):
    """reference_parse's refusal."""


def _split(buf: bytes, size: int) -> tuple[bytes, bytes]:
    """Cut a length-prefixed vector off the front of ``buf``."""
    if len(buf) < size:
        raise Bad
    n = int.from_bytes(buf[:size], "big")
    if len(buf) < size + n:
        raise Bad
    return buf[size : size + n], buf[size + n :]


def reference_parse(msg: bytes) -> ClientHello:
    """Slicing-based parser of one complete handshake message, written separately."""
    if msg[0] != 1 or len(msg) + 5 > MAX_HELLO_BYTES:
        raise Bad
    body = msg[4:]
    if len(body) < 34 or body[0] != 3:
        raise Bad
    version, rest = int.from_bytes(body[:2], "big"), body[34:]
    session_id, rest = _split(rest, 1)
    suites, rest = _split(rest, 2)
    compression, rest = _split(rest, 1)
    if len(session_id) > 32 or not suites or len(suites) % 2 or not compression:
        raise Bad
    exts: list[tuple[int, bytes]] = []
    if rest:
        block, rest = _split(rest, 2)
        if rest:
            raise Bad
        while block:
            if len(block) < 4:
                raise Bad
            ext_type = int.from_bytes(block[:2], "big")
            ext_data, block = _split(block[2:], 2)
            exts.append((ext_type, ext_data))
    types = [t for t, _ in exts]
    if len(set(types)) != len(types) or (PSK in types and types[-1] != PSK):
        raise Bad
    found: dict[int, bytes] = dict(exts)
    server_name = None
    if SNI in found:
        names, rest = _split(found[SNI], 2)
        if rest or not names or names[0] != 0:
            raise Bad
        name, rest = _split(names[1:], 2)
        if rest or not name or not name.isascii() or b"\x00" in name:
            raise Bad
        server_name = name.decode()
    versions: tuple[int, ...] = ()
    if VERSIONS in found:
        raw, rest = _split(found[VERSIONS], 1)
        if rest or not raw or len(raw) % 2:
            raise Bad
        versions = tuple(int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2))
    identities: list[bytes] = []
    if PSK in found:
        ids, rest = _split(found[PSK], 2)
        binders, rest = _split(rest, 2)
        if rest or len(ids) < 7:
            raise Bad
        while ids:
            identity, ids = _split(ids, 2)
            if not identity or len(ids) < 4:
                raise Bad
            identities.append(identity)
            ids = ids[4:]
        count = 0
        while binders:
            binder, binders = _split(binders, 1)
            if len(binder) < 32:
                raise Bad
            count += 1
        if count != len(identities):
            raise Bad
    return ClientHello(
        legacy_version=version,
        session_id=session_id,
        psk_identities=tuple(identities),
        ticket=bool(found.get(TICKET)),
        server_name=server_name,
        supported_versions=versions,
    )


@SETTINGS
@given(spec=specs())
def test_reference_parser_agrees_on_valid_hellos(spec: Spec) -> None:
    assert reference_parse(spec.message()) == spec.expected() == parse_client_hello(record(spec.message()))


# --- Real peers ---------------------------------------------------------------------

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")


def capture_openssl_hello(*args: str) -> bytes:
    """The first bytes `openssl s_client` sends to a loopback listener that never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(5)
        port = listener.getsockname()[1]
        proc = subprocess.Popen(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "example.test", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            conn, _ = listener.accept()
            with conn:
                received = b""
                deadline = time.monotonic() + 5
                while (left := deadline - time.monotonic()) > 0:
                    conn.settimeout(left)
                    try:
                        chunk = conn.recv(65536)
                    except TimeoutError:
                        break
                    if not chunk:
                        break
                    received += chunk
                    if parse_client_hello(received) is not None:
                        break
                return received
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)


@needs_openssl
@pytest.mark.parametrize("version_flag", ["-tls1_3", "-tls1_2"])
def test_openssl_s_client_hello(version_flag: str) -> None:
    hello = parse_client_hello(capture_openssl_hello(version_flag))
    assert hello is not None
    assert hello.server_name == "example.test"
    assert len(hello.session_id) in (0, 32)
    assert not hello.sslv2_compatible and hello.psk_identities == ()
    if version_flag == "-tls1_3":
        assert 0x0304 in hello.supported_versions
    else:
        assert 0x0304 not in hello.supported_versions
        assert hello.legacy_version == 0x0303


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Let a process end on its own, briefly; then kill it. Always reap it."""
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


def _accept_port(server: subprocess.Popen[bytes], timeout: float = 5) -> int:
    """The port `openssl s_server -accept 127.0.0.1:0` reports it listens on."""
    assert server.stdout is not None
    output = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(server.stdout, selectors.EVENT_READ)
        while b"\n" not in output.partition(b"ACCEPT ")[2]:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise AssertionError(f"s_server did not start: {output!r}")
            chunk = server.stdout.raw.read(4096)  # type: ignore[attr-defined]
            if not chunk:
                raise AssertionError(f"s_server exited: {output!r}")
            output += chunk
    line = output.partition(b"ACCEPT ")[2].partition(b"\n")[0]
    return int(line.rpartition(b":")[2])


def openssl_session(tmp_path: Path, version_flag: str) -> tuple[Path, bytes]:
    """One real handshake with `openssl s_server`; returns the saved session and its ticket."""
    key, cert, session = tmp_path / "key.pem", tmp_path / "cert.pem", tmp_path / "session.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-subj", "/CN=example.test", "-days", "1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", "127.0.0.1:0", "-cert", str(cert), "-key", str(key),
         "-naccept", "1", "-num_tickets", "1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        port = _accept_port(server)
        # stdin stays open so that s_client reads on after the handshake and
        # receives the TLS 1.3 ticket, which only then is written to -sess_out.
        client = subprocess.Popen(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "example.test",
             version_flag, "-sess_out", str(session)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 5
            while b"END SSL SESSION" not in (session.read_bytes() if session.exists() else b""):
                assert time.monotonic() < deadline, "s_client saved no session"
                time.sleep(0.01)
        finally:
            _stop(client)
    finally:
        _stop(server)
    text = subprocess.run(
        ["openssl", "sess_id", "-in", str(session), "-noout", "-text"],
        check=True, capture_output=True, timeout=30, text=True,
    ).stdout
    dump = text.partition("TLS session ticket:\n")[2]
    ticket = b""
    for line in dump.splitlines():
        if " - " not in line[:12]:
            break
        ticket += bytes.fromhex(line[11:58].replace("-", " "))
    assert ticket, text
    return session, ticket


@needs_openssl
@pytest.mark.parametrize("version_flag", ["-tls1_3", "-tls1_2"])
def test_openssl_s_client_resumption_hello(tmp_path: Path, version_flag: str) -> None:
    session, ticket = openssl_session(tmp_path, version_flag)
    hello = parse_client_hello(capture_openssl_hello(version_flag, "-sess_in", str(session)))
    assert hello is not None and hello.offers_session
    assert hello.server_name == "example.test"
    if version_flag == "-tls1_3":
        # A TLS 1.3 resumption offers the ticket itself as the PSK identity.
        assert hello.psk_identities == (ticket,)
        assert 0x0304 in hello.supported_versions
    else:
        assert hello.ticket and hello.psk_identities == ()
        assert len(hello.session_id) == 32


# --- The incremental reader ---------------------------------------------------------


def fed_outcomes(stream: bytes, cuts: list[int]) -> list[ClientHello | None | type[ClientHelloError]]:
    """A ClientHelloReader's answer after each piece of ``stream`` cut at ``cuts``."""
    reader, start = ClientHelloReader(), 0
    answers: list[ClientHello | None | type[ClientHelloError]] = []
    for cut in cuts:
        try:
            answers.append(reader.feed(stream[start:cut]))
        except ClientHelloError:
            answers.append(ClientHelloError)
        start = cut
    return answers


@SETTINGS
@given(spec=specs(), data=st.data())
def test_reader_fed_in_pieces_answers_as_the_whole_parse(spec: Spec, data: st.DataObject) -> None:
    """Fed piece by piece, the reader says after each piece what a parse of all so far says."""
    msg = spec.message()
    stream, _ = wrap(msg, data.draw(fragment_sizes(len(msg))))
    if data.draw(st.booleans()):
        stream = data.draw(mutated(stream))
    cuts = sorted({*chunk_points(data.draw, len(stream)), len(stream)})
    answers = fed_outcomes(stream, cuts)
    assert answers == [outcome(stream[:cut]) for cut in cuts]


def test_reader_fed_one_byte_at_a_time() -> None:
    spec = Spec(session_id=bytes(32), server_name="a.test", psks=((b"id", 1, bytes(32)),), supported_versions=(0x0304,))
    stream, hello_end = wrap(spec.message(), [1] * 2000)
    answers = fed_outcomes(stream + b"\x17\x03\x03", list(range(1, len(stream) + 4)))
    assert answers[: hello_end - 1] == [None] * (hello_end - 1)
    assert set(answers[hello_end - 1 :]) == {spec.expected()}
    sslv2 = sslv2_hello(0x0301, b"abc" * 3, b"", bytes(16))
    assert fed_outcomes(sslv2, list(range(1, len(sslv2) + 1)))[-1].sslv2_compatible  # type: ignore[union-attr]


def test_reader_cost_does_not_grow_with_the_pieces_so_far() -> None:
    """A 64 KiB stream of one-byte records, fed a record at a time: linear, not quadratic."""
    msg = Spec(cipher_suites=tuple(range(1, 5360))).message()
    records = [record(msg[i : i + 1]) for i in range(len(msg))]
    assert MAX_HELLO_BYTES - 1000 < sum(map(len, records)) < MAX_HELLO_BYTES
    reader = ClientHelloReader()
    started = time.process_time()
    answers = [reader.feed(r) for r in records]
    spent = time.process_time() - started
    assert answers[-1] is not None and answers[:-1] == [None] * (len(records) - 1)
    assert spent < 0.5, f"{spent:.3f} s for {len(records)} records"


@pytest.mark.parametrize("length", [2**14 + 1, 2**14 + 256, 2**14 + 2048, 0xFFFF])
def test_a_record_longer_than_plaintext_allows_is_refused_at_its_header(length: int) -> None:
    """RFC 8446 5.1: plaintext records hold at most 2^14 bytes; OpenSSL answers record_overflow."""
    header = b"\x16\x03\x01" + length.to_bytes(2, "big")
    with pytest.raises(ClientHelloError):
        ClientHelloReader().feed(header)
    assert parse_client_hello(b"\x16\x03\x01\x40\x00") is None  # 2^14 itself is fine


def test_reader_keeps_its_answer() -> None:
    reader = ClientHelloReader()
    with pytest.raises(ClientHelloError):
        reader.feed(b"GET /")
    with pytest.raises(ClientHelloError):
        reader.feed(record(Spec().message()))
    reader = ClientHelloReader()
    hello = reader.feed(record(Spec().message()))
    assert hello is not None and reader.feed(b"anything") is hello

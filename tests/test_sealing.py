"""Tests for twisted_sesscache.sealing: records must only open for the right key, kind and context."""

from __future__ import annotations

import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from twisted_sesscache import sealing
from twisted_sesscache.sealing import (
    KEY_BYTES,
    KeyFileError,
    SealError,
    Sealer,
    key_id,
    load_or_create_key_file,
)

OLD = bytes(range(32))
NEW = bytes(range(100, 132))
KIND = b"session"
CONTEXT = b"example.com:443"
SEALER = Sealer([OLD])
RECORD = SEALER.seal(b"tls session bytes", kind=KIND, context=CONTEXT)
OVERHEAD = 1 + 8 + 12 + 16


# --- sealing -----------------------------------------------------------------


@pytest.mark.parametrize("plaintext", [b"", b"x", os.urandom(5000)])
def test_round_trip(plaintext: bytes) -> None:
    record = SEALER.seal(plaintext, kind=KIND, context=CONTEXT)
    assert SEALER.open(record, kind=KIND, context=CONTEXT) == plaintext
    assert len(plaintext) < 16 or plaintext not in record  # short ones may occur by chance


def test_record_layout() -> None:
    first = SEALER.seal(b"abc", kind=KIND, context=CONTEXT)
    second = SEALER.seal(b"abc", kind=KIND, context=CONTEXT)
    assert len(first) == OVERHEAD + 3
    assert first[:1] == b"\x01"
    assert first[1:9] == key_id(OLD)
    assert first[9:21] != second[9:21], "nonces must be fresh"
    assert first != second


def test_open_accepts_bytes_like() -> None:
    assert SEALER.open(bytearray(RECORD), kind=KIND, context=CONTEXT) == b"tls session bytes"
    assert SEALER.open(memoryview(RECORD), kind=KIND, context=CONTEXT) == b"tls session bytes"


def test_key_id() -> None:
    assert len(key_id(OLD)) == 8
    assert key_id(OLD) == key_id(bytes(OLD))
    assert key_id(OLD) != key_id(NEW)
    assert key_id(OLD) not in OLD


def test_rotation() -> None:
    sealed_by_old = Sealer([OLD]).seal(b"old", kind=KIND, context=CONTEXT)
    rotated = Sealer([NEW, OLD])
    assert rotated.open(sealed_by_old, kind=KIND, context=CONTEXT) == b"old"
    sealed_by_new = rotated.seal(b"new", kind=KIND, context=CONTEXT)
    assert sealed_by_new[1:9] == key_id(NEW)
    with pytest.raises(SealError):
        Sealer([OLD]).open(sealed_by_new, kind=KIND, context=CONTEXT)


def test_same_key_id_but_other_key_fails() -> None:
    forged = RECORD[:9] + Sealer([NEW]).seal(b"x", kind=KIND, context=CONTEXT)[9:]
    with pytest.raises(SealError):
        SEALER.open(forged, kind=KIND, context=CONTEXT)


@pytest.mark.parametrize(
    ("kind", "context"),
    [
        (b"ticket-key", CONTEXT),
        (b"client-session", CONTEXT),
        (KIND, b"other.example:443"),
        (KIND, b""),
        (b"", KIND + CONTEXT),
        # Same concatenation, different split: length prefixes must tell them apart.
        (KIND + b"e", CONTEXT[1:]),
        (KIND[:-1], b"n" + CONTEXT),
    ],
)
def test_wrong_kind_or_context_rejected(kind: bytes, context: bytes) -> None:
    with pytest.raises(SealError):
        SEALER.open(RECORD, kind=kind, context=context)


def test_truncation_at_every_length_rejected() -> None:
    for length in range(len(RECORD)):
        with pytest.raises(SealError):
            SEALER.open(RECORD[:length], kind=KIND, context=CONTEXT)


def test_wrong_version_rejected() -> None:
    for version in (0, 2, 255):
        with pytest.raises(SealError, match="version"):
            SEALER.open(bytes([version]) + RECORD[1:], kind=KIND, context=CONTEXT)


def test_unknown_key_id_rejected() -> None:
    with pytest.raises(SealError, match="unknown key"):
        SEALER.open(RECORD[:1] + key_id(NEW) + RECORD[9:], kind=KIND, context=CONTEXT)


@pytest.mark.parametrize("record", [b"", None, "text", 12345])
def test_garbage_rejected(record: object) -> None:
    with pytest.raises(SealError):
        SEALER.open(record, kind=KIND, context=CONTEXT)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_open(record: bytes) -> None:
    with pytest.raises(SealError):
        SEALER.open(record, kind=KIND, context=CONTEXT)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=150))
def test_random_bytes_with_valid_header_never_open(tail: bytes) -> None:
    with pytest.raises(SealError):
        SEALER.open(RECORD[:9] + tail, kind=KIND, context=CONTEXT)


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_any_mutation_never_opens(data: st.DataObject) -> None:
    start = data.draw(st.integers(0, len(RECORD)), label="start")
    end = data.draw(st.integers(start, len(RECORD)), label="end")
    replacement = data.draw(st.binary(max_size=40), label="replacement")
    mutated = RECORD[:start] + replacement + RECORD[end:]
    assume(mutated != RECORD)
    with pytest.raises(SealError):
        SEALER.open(mutated, kind=KIND, context=CONTEXT)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(RECORD) - 1), st.integers(1, 255))
def test_any_byte_flip_never_opens(index: int, mask: int) -> None:
    mutated = bytearray(RECORD)
    mutated[index] ^= mask
    with pytest.raises(SealError):
        SEALER.open(bytes(mutated), kind=KIND, context=CONTEXT)


@pytest.mark.parametrize("keys", [[], [b""], [b"k" * 31], [b"k" * 33], [OLD, b"short"], ["k" * 32]])
def test_sealer_rejects_bad_keys(keys: list[bytes]) -> None:
    with pytest.raises(ValueError):
        Sealer(keys)


def test_sealer_accepts_duplicate_keys() -> None:
    assert Sealer([OLD, OLD]).open(RECORD, kind=KIND, context=CONTEXT) == b"tls session bytes"


# --- key files ---------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int) -> None:
    path.write_bytes(data)
    path.chmod(mode)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_key_file_created_0600_and_reread(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "seal.key"
    old_umask = os.umask(umask)
    try:
        key = load_or_create_key_file(path)
    finally:
        os.umask(old_umask)
    assert len(key) == KEY_BYTES
    assert path.read_bytes() == key
    assert _mode(path) == 0o600
    assert load_or_create_key_file(str(path)) == key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seal.key"], "no temp files left"


def test_existing_key_file_is_used(tmp_path: Path) -> None:
    path = tmp_path / "seal.key"
    _write(path, NEW, 0o600)
    assert load_or_create_key_file(path) == NEW
    path.chmod(0o400)  # read-only for the owner is fine too
    assert load_or_create_key_file(path) == NEW


def test_new_key_files_differ(tmp_path: Path) -> None:
    assert load_or_create_key_file(tmp_path / "a") != load_or_create_key_file(tmp_path / "b")


@pytest.mark.parametrize("size", [0, 1, 31, 33, 64])
def test_wrong_size_key_file_rejected(tmp_path: Path, size: int) -> None:
    path = tmp_path / "seal.key"
    _write(path, b"k" * size, 0o600)
    with pytest.raises(KeyFileError) as info:
        load_or_create_key_file(path)
    assert str(path) in str(info.value)
    assert "/dev/urandom" in str(info.value)
    assert path.read_bytes() == b"k" * size, "a bad key file must never be overwritten"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_key_file_open_to_others_rejected(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "seal.key"
    _write(path, NEW, mode)
    with pytest.raises(KeyFileError) as info:
        load_or_create_key_file(path)
    assert str(path) in str(info.value)
    assert "chmod 600" in str(info.value)


def test_key_file_that_is_a_directory_rejected(tmp_path: Path) -> None:
    path = tmp_path / "seal.key"
    path.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match=str(path)):
        load_or_create_key_file(path)


def test_key_file_in_missing_directory_rejected(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "seal.key"
    with pytest.raises(KeyFileError, match=str(path)):
        load_or_create_key_file(path)


def test_creation_race_reads_the_winners_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process creates the file after our existence check but before ours lands."""
    path = tmp_path / "seal.key"
    real_link = os.link
    calls: list[str] = []

    def racing_link(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == 1:
            _write(path, NEW, 0o600)  # the other process wins
        real_link(src, dst)

    monkeypatch.setattr(sealing.os, "link", racing_link)
    assert load_or_create_key_file(path) == NEW
    assert calls == [str(path)]
    assert path.read_bytes() == NEW
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seal.key"], "no temp files left"


def test_concurrent_creation_agrees(tmp_path: Path) -> None:
    for round_ in range(5):
        path = tmp_path / f"seal-{round_}.key"
        barrier = threading.Barrier(8)

        def load() -> bytes:
            barrier.wait()
            return load_or_create_key_file(path)

        with ThreadPoolExecutor(max_workers=8) as pool:
            keys = list(pool.map(lambda _: load(), range(8)))
        assert len(set(keys)) == 1
        assert path.read_bytes() == keys[0]
    assert len(list(tmp_path.iterdir())) == 5, "no temp files left"

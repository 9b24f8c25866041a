"""Seal session records and ticket keys before they leave the process.

Everything stored in Redis is readable by whoever can reach Redis, so each
record is encrypted and authenticated with AES-256-GCM under a local key file.
The associated data binds the record to its *kind* and *context* so a record
copied to another key, cache or TLS session-ID context simply fails to open.

Record layout::

    version (1) | key id (8) | nonce (12) | ciphertext + GCM tag (16)
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shlex
import stat
import struct
from collections.abc import Sequence
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from twisted_sesscache.exceptions import ConfigurationError, KeyFileError, SealError, UnknownKeyError

__all__ = [
    "KEY_BYTES",
    "UNSEALED",
    "KeyFileError",
    "RecordSealer",
    "SealError",
    "Sealer",
    "Unsealed",
    "check_key_file",
    "key_fingerprint",
    "key_id",
    "load_or_create_key_file",
]

KEY_BYTES = 32

_VERSION = b"\x01"
_KEY_ID_BYTES = 8
_NONCE_BYTES = 12
_TAG_BYTES = 16
_HEADER_BYTES = len(_VERSION) + _KEY_ID_BYTES + _NONCE_BYTES
_KEY_ID_LABEL = b"twisted_sesscache sealing key id v1\x00"




def key_id(key: bytes) -> bytes:
    """Name a key in records without revealing it, so rotation can pick the right key."""
    return hashlib.sha256(_KEY_ID_LABEL + bytes(key)).digest()[:_KEY_ID_BYTES]


def key_fingerprint(key: bytes) -> str:
    """What logs and ``/stats.json`` show of a key, so that a fleet's members can be compared."""
    return key_id(key).hex()


def _aad(header: bytes, kind: bytes, context: bytes) -> bytes:
    """Length-prefix kind and context so no two (kind, context) pairs share an encoding."""
    return b"".join(
        (header, struct.pack(">I", len(kind)), kind, struct.pack(">I", len(context)), context)
    )


class Sealer:
    """AES-256-GCM sealing with key rotation: the first key seals, every key opens."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        """Keep only cipher objects (not raw keys) indexed by key id, for O(1) lookup on open."""
        if not keys:
            raise ValueError("Sealer needs at least one key")
        self._ciphers: dict[bytes, AESGCM] = {}
        fingerprints: dict[bytes, bytes] = {}
        for index, key in enumerate(keys):
            if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
                raise ValueError(f"key {index} must be {KEY_BYTES} bytes")
            kid = key_id(key)
            digest = hashlib.sha256(bytes(key)).digest()
            if fingerprints.setdefault(kid, digest) != digest:
                raise ValueError(f"key {index} has the same key id as an earlier, different key")
            self._ciphers.setdefault(kid, AESGCM(bytes(key)))
        self._sealing_id = key_id(keys[0])

    def seal(self, plaintext: bytes, *, kind: bytes, context: bytes) -> bytes:
        """Encrypt under the current key with a fresh random nonce; rotate keys long before 2**32 seals."""
        header = _VERSION + self._sealing_id
        nonce = os.urandom(_NONCE_BYTES)
        cipher = self._ciphers[self._sealing_id]
        return header + nonce + cipher.encrypt(nonce, plaintext, _aad(header, kind, context))

    def open(self, record: bytes | bytearray | memoryview, *, kind: bytes, context: bytes) -> bytes:
        """Return the plaintext, or raise SealError: callers treat any bad record as a cache miss."""
        if not isinstance(record, (bytes, bytearray, memoryview)):
            raise SealError("record is not bytes")
        record = bytes(record)
        if len(record) < _HEADER_BYTES + _TAG_BYTES:
            raise SealError("record is too short")
        if record[:1] != _VERSION:
            raise SealError("unsupported record format version")
        header = record[: 1 + _KEY_ID_BYTES]
        cipher = self._ciphers.get(header[1:])
        if cipher is None:
            raise UnknownKeyError("record was sealed with an unknown key")
        nonce = record[len(header) : _HEADER_BYTES]
        try:
            return cipher.decrypt(nonce, record[_HEADER_BYTES:], _aad(header, kind, context))
        except (InvalidTag, OverflowError) as exc:
            raise SealError("record failed authentication (tampered, or other kind/context)") from exc


class RecordSealer(Protocol):
    """What the records of a store go through on their way in and out."""

    def seal(self, plaintext: bytes, *, kind: bytes, context: bytes) -> bytes: ...

    def open(self, record: bytes | bytearray | memoryview, *, kind: bytes, context: bytes) -> bytes: ...


class Unsealed:
    """Records kept as they are, for a store only this process reads and writes.

    Sealing guards records against whoever else can read or write the store;
    in this process's own memory there is nobody else, and sealing a session
    with AES-GCM costs ~90,000 instructions under Debian's cryptography 38 (a
    quarter of what a resumed TLS 1.3 handshake adds to bare Twisted's).
    """

    def seal(self, plaintext: bytes, *, kind: bytes, context: bytes) -> bytes:
        return plaintext

    def open(self, record: bytes | bytearray | memoryview, *, kind: bytes, context: bytes) -> bytes:
        return bytes(record)


UNSEALED = Unsealed()


def _fix_hint(path: str) -> str:
    quoted = shlex.quote(path)
    return (
        f"delete it to have a new key generated, or write one with: "
        f"(umask 077; head -c {KEY_BYTES} /dev/urandom > {quoted}); chmod 600 {quoted}"
    )


def _read_key_file(path: str) -> bytes:
    """Read and vet an existing key file; FileNotFoundError propagates so the caller can create it."""
    # Non-blocking: opening a FIFO for reading would otherwise wait for a writer, forever.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file; {_fix_hint(path)}")
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"key file {path} is accessible by group/others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {shlex.quote(path)} "
                f"(and replace the key if others may have read it)"
            )
        data = b""
        while len(data) <= KEY_BYTES:
            chunk = os.read(fd, KEY_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if len(data) != KEY_BYTES:
        size = f"{len(data)}" if len(data) <= KEY_BYTES else f"more than {KEY_BYTES}"
        raise KeyFileError(
            f"key file {path} holds {size} bytes, expected exactly {KEY_BYTES}; {_fix_hint(path)}"
        )
    return data


def _fsync_dir(directory: str) -> None:
    """Make the new directory entry durable; best effort where directories cannot be fsynced."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_key_file(path: str) -> bytes:
    """Publish a complete 0600 key file atomically; raise FileExistsError if another process won.

    The key is written and fsynced under a private temporary name and then hard-linked
    into place, so a concurrent reader never sees an empty or half-written key file.
    """
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    key = secrets.token_bytes(KEY_BYTES)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # independent of umask
            view = memoryview(key)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)  # atomic; fails with FileExistsError if path appeared meanwhile
    finally:
        os.unlink(tmp)
    _fsync_dir(directory)
    return key


def check_key_file(path: str | os.PathLike[str], *, setting: str) -> None:
    """Refuse, naming ``setting``, a key file that exists and cannot be used or that could not be created.

    Reads only: the file is created when the cache is built.
    """
    path = os.fspath(path)
    try:
        _read_key_file(path)
    except FileNotFoundError:
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
            raise ConfigurationError(
                setting, f"cannot create key file {path}: its directory is missing or not writable"
            ) from None
    except KeyFileError as error:
        raise ConfigurationError(setting, str(error)) from None
    except OSError as exc:
        raise ConfigurationError(setting, f"cannot read key file {path}: {exc.strerror}; {_fix_hint(path)}") from None


def load_or_create_key_file(path: str | os.PathLike[str]) -> bytes:
    """Return the 32-byte key at path, creating it (mode 0600) on first use.

    Sharing one key file lets every process, and every restart, open the others' records.
    If another process creates the file concurrently, its key wins and is returned.
    """
    path = os.fspath(path)
    for _ in range(3):
        try:
            return _read_key_file(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {path}: {exc.strerror}; {_fix_hint(path)}") from exc
        try:
            return _create_key_file(path)
        except FileExistsError:
            continue  # lost the race: read the winner's key
        except OSError as exc:
            raise KeyFileError(
                f"cannot create key file {path}: {exc.strerror}; check that the directory "
                f"exists and is writable, or {_fix_hint(path)}"
            ) from exc
    raise KeyFileError(f"key file {path} keeps appearing and disappearing; {_fix_hint(path)}")

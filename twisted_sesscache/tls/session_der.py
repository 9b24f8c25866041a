"""What an encoded session says: protocol version, resumability, expiry, in both runtimes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SessionFacts:
    version: int
    resumable: bool
    expiry: int | None
    """``SSL_SESSION_get_time + get_timeout``, seconds since the epoch."""


def session_facts(der: bytes) -> SessionFacts | None:
    """Read protocol version, resumability and expiry from ``i2d_SSL_SESSION`` output.

    The bundled runtime cannot call ``SSL_SESSION_is_resumable``,
    ``SSL_SESSION_get_time`` or ``SSL_SESSION_get_timeout``, but the encoding
    (``ssl/ssl_asn1.c``, stable from 1.1.1 to 4.0) carries them: resumable means
    a session ID or a ticket, as ``SSL_SESSION_is_resumable`` decides (the
    in-memory ``not_resumable`` flag is never encoded, and DER copies never
    carry it). None when the bytes do not parse.
    """
    try:
        tag, start, end = _tlv(der, 0)
        if tag != 0x30:
            return None
        universal: list[bytes] = []
        tagged: dict[int, bytes] = {}
        offset = start
        while offset < end:
            tag, value_start, value_end = _tlv(der, offset)
            value = der[value_start:value_end]
            if tag & 0xE0 == 0xA0:  # [n] EXPLICIT
                _, inner_start, inner_end = _tlv(value, 0)
                tagged[tag & 0x1F] = value[inner_start:inner_end]
            else:
                universal.append(value)
            offset = value_end
        version = int.from_bytes(universal[1], "big")
        session_id = universal[3]
    except (IndexError, ValueError):
        return None
    created = int.from_bytes(tagged[1], "big", signed=True) if 1 in tagged else None
    timeout = int.from_bytes(tagged[2], "big", signed=True) if 2 in tagged else None
    expiry = created + timeout if created is not None and timeout else None
    return SessionFacts(version, bool(session_id) or bool(tagged.get(10)), expiry)


def _tlv(data: bytes, offset: int) -> tuple[int, int, int]:
    """Tag, value start and value end of the DER element at ``offset``."""
    tag, length = data[offset], data[offset + 1]
    offset += 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4:
            raise ValueError("unsupported DER length")
        length = int.from_bytes(data[offset : offset + count], "big")
        offset += count
    if offset + length > len(data):
        raise ValueError("truncated DER")
    return tag, offset, offset + length

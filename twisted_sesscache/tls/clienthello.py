"""Just enough TLS to read what a session cache needs from a ClientHello.

A server-side session cache has to know which session a client wants to
resume *before* OpenSSL processes the hello (so the session can be fetched
from shared storage in time), which means peeking at the raw TCP bytes.
Only the resumption-relevant fields are extracted; everything else is skipped,
but every length is still checked so that a malformed or hostile hello is
rejected instead of misread.

:class:`ClientHelloReader` is fed the bytes as they arrive and looks at each
once, so a hello trickled in one-byte records costs no more than one sent
whole; :func:`parse_client_hello` is the same reader fed everything at once.
``None`` means "well-formed so far, send more". The answer for a prefix never
contradicts the answer for a longer stream: once a stream is rejected it stays
rejected, and once a hello is complete the bytes after it do not matter.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted_sesscache.exceptions import ClientHelloError

__all__ = [
    "MAX_HELLO_BYTES", "ClientHello", "ClientHelloError", "ClientHelloReader", "parse_client_hello", "peek_session_id",
]

#: The hello must be complete within this many bytes of the stream, so that a
#: client can never make the server buffer more than this while it waits.
MAX_HELLO_BYTES: int = 64 * 1024

_HANDSHAKE = 22  # record content type
_CLIENT_HELLO = 1  # handshake message type
_RECORD_HEADER = 5
# A ClientHello travels in plaintext records, which RFC 8446 (5.1) bounds at
# 2^14 bytes; a longer one goes to OpenSSL at once, for its record_overflow alert.
_MAX_RECORD_PAYLOAD = 2**14
_SSLV2_HEADER = 11  # length, type, version, and the three lengths
_MAX_SESSION_ID = 32

_EXT_SERVER_NAME = 0
_EXT_SESSION_TICKET = 35
_EXT_PRE_SHARED_KEY = 41
_EXT_SUPPORTED_VERSIONS = 43


class _NeedMore(Exception):
    """Internal: the structure being read continues past the bytes received."""


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What a ClientHello offers for resumption, plus what selects a cache."""

    legacy_version: int
    session_id: bytes  # b"" when none
    psk_identities: tuple[bytes, ...]
    ticket: bool  # non-empty session_ticket extension present
    server_name: str | None
    supported_versions: tuple[int, ...]
    sslv2_compatible: bool = False

    @property
    def offers_session(self) -> bool:
        """Whether a cache lookup could possibly resume this connection.

        TLS 1.3 clients usually send a random 32-byte legacy session ID for
        middlebox compatibility, so this is a cheap pre-filter, not a promise.
        """
        return bool(self.session_id or self.psk_identities or self.ticket)


class _Reader:
    """A cursor over the bytes received so far of an SSL 2.0 hello, whose size is known.

    Every read names the end of the enclosing structure (``limit``): running
    past it is a malformed hello, while running past the bytes *received* only
    means more input is needed. Checking the limit first is what lets a
    truncated-but-valid prefix be told apart from a lie in a length field.
    """

    __slots__ = ("buf", "pos")

    def __init__(self, buf: memoryview, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos

    def _advance(self, n: int, limit: int) -> int:
        start = self.pos
        end = start + n
        if end > limit:
            raise ClientHelloError("field overruns its enclosing structure")
        if end > len(self.buf):
            raise _NeedMore
        self.pos = end
        return start

    def u8(self, limit: int) -> int:
        return self.buf[self._advance(1, limit)]

    def u16(self, limit: int) -> int:
        p = self._advance(2, limit)
        return (self.buf[p] << 8) | self.buf[p + 1]

    def skip(self, n: int, limit: int) -> None:
        self._advance(n, limit)

    def take(self, n: int, limit: int) -> bytes:
        p = self._advance(n, limit)
        return bytes(self.buf[p : p + n])


# Record header, handshake header, legacy_version and random: the session ID's length byte follows.
_SESSION_ID_AT = _RECORD_HEADER + 4 + 2 + 32


def peek_session_id(data: bytes | bytearray) -> bytes | None:
    """The legacy session ID of a ClientHello whose first record starts with all of it; else None.

    A look at a fixed place, nothing else checked, to skip reading a hello
    whose session needs no lookup; anything else is read as usual.
    """
    at = _SESSION_ID_AT
    if len(data) <= at or data[0] != _HANDSHAKE or data[_RECORD_HEADER] != _CLIENT_HELLO:
        return None
    length = data[at]
    record = (data[3] << 8) | data[4]
    if not 0 < length <= _MAX_SESSION_ID or len(data) < at + 1 + length or record < at + 1 + length - _RECORD_HEADER:
        return None
    return bytes(data[at + 1 : at + 1 + length])


def parse_client_hello(data: bytes | bytearray | memoryview) -> ClientHello | None:
    """Parse the start of a TLS connection as seen by the server.

    ``data`` is everything received so far, from the first byte. Returns
    ``None`` while the bytes may still become a ClientHello that fits within
    :data:`MAX_HELLO_BYTES`; raises :class:`ClientHelloError` once they cannot:
    at once for the record layer and the message's type and size, when the
    message is complete for its contents. Bytes after a complete hello are
    ignored.
    """
    return ClientHelloReader().feed(data)


class ClientHelloReader:
    """Reads a ClientHello from the stream as it arrives, each byte looked at once.

    :meth:`feed` takes the bytes received since the last call and answers as
    :func:`parse_client_hello` would for everything received so far. Record
    headers are checked as they complete and handshake payload is copied once;
    the message itself is parsed once, when it is whole. A connection fed one
    byte at a time costs what it would cost fed all at once.
    """

    __slots__ = ("_seen", "_header", "_left", "_message", "_need", "_sslv2", "_answer", "_error")

    def __init__(self) -> None:
        self._seen = 0  # bytes of the stream taken in, at most MAX_HELLO_BYTES
        self._header = bytearray()  # the record header being read
        self._left = 0  # payload bytes of the current record still to come
        self._message = bytearray()  # handshake payload, up to the end of the first message
        self._need = 0  # that message's size with its header; 0 while unknown
        self._sslv2: bytearray | None = None  # the whole stream, for an SSL 2.0 hello
        self._answer: ClientHello | None = None
        self._error: ClientHelloError | None = None

    @property
    def started(self) -> bool:
        """Whether any bytes were fed."""
        return self._seen > 0 or self._error is not None

    def feed(self, data: bytes | bytearray | memoryview) -> ClientHello | None:
        """The hello once complete (and for good), ``None`` while more is needed; raises once it cannot be one."""
        if self._answer is not None:
            return self._answer
        if self._error is not None:
            raise self._error
        # Only the bound's worth of the stream is ever looked at; copying a
        # caller's buffer keeps no view onto it alive in a traceback.
        room = MAX_HELLO_BYTES - self._seen
        chunk = data[:room] if isinstance(data, bytes) else bytes(data[:room])
        try:
            answer = self._take(chunk) if chunk else None
            self._seen += len(chunk)
            if answer is None and self._seen >= MAX_HELLO_BYTES:
                # Whatever is missing lies beyond the bound, so no amount of
                # further input can make this a hello we are willing to wait for.
                raise ClientHelloError(f"no complete ClientHello within the first {MAX_HELLO_BYTES} bytes")
        except ClientHelloError as error:
            self._error = error
            raise
        self._answer = answer
        return answer

    def _take(self, chunk: bytes) -> ClientHello | None:
        if self._sslv2 is None and self._seen == 0 and chunk[0] & 0x80:
            self._sslv2 = bytearray()
        if self._sslv2 is not None:
            return self._take_sslv2(chunk)
        view = memoryview(chunk)
        pos, n = 0, len(chunk)
        while pos < n:
            if self._left:
                part = view[pos : pos + self._left]
                pos += len(part)
                self._left -= len(part)
                hello = self._payload(part)
                if hello is not None:
                    return hello
            else:
                part = view[pos : pos + _RECORD_HEADER - len(self._header)]
                pos += len(part)
                self._record_header(part)
        return None

    def _record_header(self, part: memoryview) -> None:
        """Check a record header as far as it has come; a whole one opens its payload."""
        header = self._header
        had = len(header)
        header += part
        if had == 0 and header[0] != _HANDSHAKE:
            raise ClientHelloError(f"expected a handshake record, got content type {header[0]}")
        if had <= 1 < len(header) and header[1] != 3:
            raise ClientHelloError("record version is not TLS")
        if len(header) == _RECORD_HEADER:
            length = (header[3] << 8) | header[4]
            if not 0 < length <= _MAX_RECORD_PAYLOAD:
                raise ClientHelloError(f"bad handshake record length {length}")
            self._left = length
            header.clear()

    def _payload(self, part: memoryview) -> ClientHello | None:
        """Append handshake payload up to the end of the first message; parse that once whole."""
        message = self._message
        had = len(message)
        message += part[: self._need - had] if self._need else part
        if had == 0 and message[0] != _CLIENT_HELLO:
            raise ClientHelloError(f"first handshake message has type {message[0]}, not ClientHello")
        if not self._need and len(message) >= 4:
            self._need = 4 + ((message[1] << 16) | (message[2] << 8) | message[3])
            # At least one record header precedes the message, and all of it must fit.
            if self._need + _RECORD_HEADER > MAX_HELLO_BYTES:
                raise ClientHelloError(f"ClientHello of {self._need - 4} bytes is too large")
            del message[self._need :]
        if not self._need or len(message) < self._need:
            return None
        return _parse_complete(bytes(message))

    def _take_sslv2(self, chunk: bytes) -> ClientHello | None:
        """An SSL 2.0 hello announces its size first: its header is checked as it comes, the rest once whole."""
        buf = self._sslv2
        assert buf is not None
        had = len(buf)
        buf += chunk[: self._need - had] if self._need else chunk
        if not self._need and len(buf) >= 2:
            self._need = 2 + (((buf[0] << 8) | buf[1]) & 0x7FFF)
            del buf[self._need :]
        if had >= _SSLV2_HEADER and len(buf) < self._need:
            return None  # every field the header holds was checked when it completed
        try:
            return _parse_sslv2(memoryview(bytes(buf)))
        except _NeedMore:
            return None


def _parse_complete(message: bytes) -> ClientHello:
    """A whole handshake message: no read can run out of bytes, only out of what encloses it.

    Fields are read inline, with few calls: this runs for every connection of a server that reads hellos.
    """
    if message[0] != _CLIENT_HELLO:
        raise ClientHelloError(f"first handshake message has type {message[0]}, not ClientHello")
    end = 4 + ((message[1] << 16) | (message[2] << 8) | message[3])
    # At least one record header precedes the message, and all of it must fit.
    if end + _RECORD_HEADER > MAX_HELLO_BYTES:
        raise ClientHelloError(f"ClientHello of {end - 4} bytes is too large")
    if end > len(message):  # pragma: no cover - the reader hands over exactly the announced message
        raise ClientHelloError("ClientHello ends early")
    return _parse_body(message, 4, end)


def _overrun() -> ClientHelloError:
    return ClientHelloError("field overruns its enclosing structure")


def _vector(buf: bytes, pos: int, size: int, limit: int) -> int:
    """Where the vector whose ``size``-byte length prefix starts at ``pos`` ends; checked against ``limit``."""
    start = pos + size
    if start > limit:
        raise _overrun()
    end = start + (buf[pos] if size == 1 else (buf[pos] << 8) | buf[pos + 1])
    if end > limit:
        raise ClientHelloError("vector length overruns its enclosing structure")
    return end


def _parse_body(buf: bytes, pos: int, end: int) -> ClientHello:
    if pos + 2 + 32 > end:
        raise _overrun()
    legacy_version = (buf[pos] << 8) | buf[pos + 1]
    if legacy_version >> 8 != 3:
        raise ClientHelloError(f"legacy_version {legacy_version:#06x} is not TLS")
    pos += 2 + 32  # version, random
    sid_end = _vector(buf, pos, 1, end)
    if sid_end - pos - 1 > _MAX_SESSION_ID:
        raise ClientHelloError("session_id longer than 32 bytes")
    session_id = buf[pos + 1 : sid_end]
    suites_end = _vector(buf, sid_end, 2, end)
    n = suites_end - sid_end - 2
    if n < 2 or n % 2:
        raise ClientHelloError("bad cipher_suites length")
    compression_end = _vector(buf, suites_end, 1, end)
    if compression_end == suites_end + 1:
        raise ClientHelloError("empty compression_methods")
    pos = compression_end

    server_name: str | None = None
    psk_identities: tuple[bytes, ...] = ()
    ticket = False
    supported_versions: tuple[int, ...] = ()
    if pos < end:  # extensions are optional before TLS 1.3
        if _vector(buf, pos, 2, end) != end:
            raise ClientHelloError("trailing bytes after extensions")
        pos += 2
        seen: set[int] = set()
        while pos < end:
            if pos + 4 > end:
                raise _overrun()
            ext_type = (buf[pos] << 8) | buf[pos + 1]
            pos += 4
            ext_end = pos + ((buf[pos - 2] << 8) | buf[pos - 1])
            if ext_end > end:
                raise ClientHelloError("vector length overruns its enclosing structure")
            if ext_type in seen:
                raise ClientHelloError(f"duplicate extension {ext_type}")
            seen.add(ext_type)
            if ext_type == _EXT_SERVER_NAME:
                server_name = _parse_server_name(buf, pos, ext_end)
            elif ext_type == _EXT_PRE_SHARED_KEY:
                if ext_end != end:
                    raise ClientHelloError("pre_shared_key is not the last extension")
                psk_identities = _parse_pre_shared_key(buf, pos, ext_end)
            elif ext_type == _EXT_SUPPORTED_VERSIONS:
                supported_versions = _parse_supported_versions(buf, pos, ext_end)
            elif ext_type == _EXT_SESSION_TICKET:
                ticket = ext_end > pos
            pos = ext_end
    return ClientHello(
        legacy_version=legacy_version,
        session_id=session_id,
        psk_identities=psk_identities,
        ticket=ticket,
        server_name=server_name,
        supported_versions=supported_versions,
    )


def _parse_server_name(buf: bytes, pos: int, ext_end: int) -> str:
    """RFC 6066 section 3; like OpenSSL, accept exactly one host_name entry."""
    if _vector(buf, pos, 2, ext_end) != ext_end:
        raise ClientHelloError("trailing bytes in server_name")
    pos += 2
    if pos == ext_end:
        raise ClientHelloError("empty server_name list")
    if buf[pos] != 0:
        raise ClientHelloError("server_name entry is not a host_name")
    if _vector(buf, pos + 1, 2, ext_end) != ext_end:
        raise ClientHelloError("server_name must hold exactly one host_name")
    raw = buf[pos + 3 : ext_end]
    if not raw:
        raise ClientHelloError("empty host_name")
    # A/U-labels only: the wire form is ASCII; a NUL could make two names alike.
    if not raw.isascii() or 0 in raw:
        raise ClientHelloError("host_name is not an ASCII name")
    return raw.decode("ascii")


def _parse_supported_versions(buf: bytes, pos: int, ext_end: int) -> tuple[int, ...]:
    if _vector(buf, pos, 1, ext_end) != ext_end:
        raise ClientHelloError("trailing bytes in supported_versions")
    n = ext_end - pos - 1
    if n < 2 or n % 2:
        raise ClientHelloError("bad supported_versions length")
    return tuple((buf[i] << 8) | buf[i + 1] for i in range(pos + 1, ext_end, 2))


def _parse_pre_shared_key(buf: bytes, pos: int, ext_end: int) -> tuple[bytes, ...]:
    """RFC 8446 section 4.2.11: identities, then one binder per identity."""
    ids_end = _vector(buf, pos, 2, ext_end)
    pos += 2
    if ids_end - pos < 7:
        raise ClientHelloError("pre_shared_key identities list too short")
    identities: list[bytes] = []
    while pos < ids_end:
        id_end = _vector(buf, pos, 2, ids_end)
        if id_end == pos + 2:
            raise ClientHelloError("empty PSK identity")
        identities.append(buf[pos + 2 : id_end])
        pos = id_end + 4  # obfuscated_ticket_age
        if pos > ids_end:
            raise _overrun()
    if _vector(buf, pos, 2, ext_end) != ext_end:
        raise ClientHelloError("trailing bytes in pre_shared_key")
    pos += 2
    binders = 0
    while pos < ext_end:
        binder_end = _vector(buf, pos, 1, ext_end)
        if binder_end - pos - 1 < 32:
            raise ClientHelloError("PSK binder shorter than 32 bytes")
        pos = binder_end
        binders += 1
    if binders != len(identities):
        raise ClientHelloError("PSK binder count differs from identity count")
    return tuple(identities)


def _parse_sslv2(view: memoryview) -> ClientHello:
    """RFC 5246 appendix E.2: an SSL 2.0 CLIENT-HELLO announcing TLS."""
    r = _Reader(view)
    end = 2 + (r.u16(2) & 0x7FFF)
    if r.u8(end) != _CLIENT_HELLO:
        raise ClientHelloError("SSLv2 message is not a CLIENT-HELLO")
    version = r.u16(end)
    if version >> 8 != 3:
        raise ClientHelloError(f"SSLv2 hello version {version:#06x} is not TLS")
    specs_len = r.u16(end)
    sid_len = r.u16(end)
    challenge_len = r.u16(end)
    if specs_len == 0 or specs_len % 3:
        raise ClientHelloError("bad SSLv2 cipher_spec_length")
    if sid_len > _MAX_SESSION_ID:
        raise ClientHelloError("SSLv2 session_id longer than 32 bytes")
    if not 16 <= challenge_len <= 32:
        raise ClientHelloError("bad SSLv2 challenge_length")
    if r.pos + specs_len + sid_len + challenge_len != end:
        raise ClientHelloError("SSLv2 hello length disagrees with its contents")
    r.skip(specs_len, end)
    session_id = r.take(sid_len, end)
    r.skip(challenge_len, end)
    return ClientHello(
        legacy_version=version,
        session_id=session_id,
        psk_identities=(),
        ticket=False,
        server_name=None,
        supported_versions=(),
        sslv2_compatible=True,
    )

"""Redis's wire format (RESP2), both ways, in as few Python steps as a request allows.

txredisapi spends more CPU per GET than the rest of the store does: it
parses a reply line by line through a LineReceiver, copies a bulk reply
twice, passes it through a DeferredQueue and two more Deferreds, and when
pipelined replies arrive in one read it pauses the transport and waits a
reactor turn per reply. Here a read is split into replies in one pass over
the bytes, and each reply goes straight to the Deferred that waits for it.
"""

from __future__ import annotations

from typing import Any

from txredisapi import InvalidResponse, ResponseError

# The longest reply line (a header or a status) and bulk reply this store accepts: the records are
# a few KiB; anything larger means a broken or hostile peer, and the connection is dropped.
MAX_LINE = 64 * 1024
MAX_BULK = 16 * 1024 * 1024
MAX_DEPTH = 8  # ROLE nests two levels; nothing this store sends nests more

_INCOMPLETE = -1


def encode_command(*args: Any) -> bytes:
    """One request: ``*N`` then each argument as a bulk string (str as UTF-8, numbers in decimal)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif not isinstance(arg, bytes):
            arg = bytes(arg) if isinstance(arg, (bytearray, memoryview)) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class ReplyReader:
    """Splits the bytes Redis sends into replies; keeps an incomplete one until the rest arrives.

    Replies: bytes (bulk), None (nil), str (status), int, list (array), or a
    ``ResponseError`` (an error reply, delivered as a value like txredisapi
    does). A malformed or oversized reply raises ``InvalidResponse``.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Any]:
        buffer = self._buffer + data if self._buffer else data
        replies: list[Any] = []
        position = 0
        size = len(buffer)
        while position < size:
            reply, end = _parse(buffer, position, 0)
            if end == _INCOMPLETE:
                if size - position > MAX_BULK + MAX_LINE:
                    raise InvalidResponse("a Redis reply is too large")
                break
            replies.append(reply)
            position = end
        self._buffer = buffer[position:] if position else buffer
        return replies


def _parse(buffer: bytes, position: int, depth: int) -> tuple[Any, int]:
    """The reply starting at ``position`` and where the next one starts, or ``(None, _INCOMPLETE)``."""
    line_end = buffer.find(b"\r\n", position)
    if line_end < 0:
        if len(buffer) - position > MAX_LINE:
            raise InvalidResponse("a Redis reply line is too long")
        return None, _INCOMPLETE
    kind = buffer[position]
    if kind == 0x24:  # $ bulk
        length = _number(buffer, position + 1, line_end)
        if length < 0:
            return None, line_end + 2
        if length > MAX_BULK:
            raise InvalidResponse(f"a Redis bulk reply of {length} bytes is too large")
        start = line_end + 2
        stop = start + length
        if len(buffer) < stop + 2:
            return None, _INCOMPLETE
        return buffer[start:stop], stop + 2
    if kind == 0x2B:  # + status
        return buffer[position + 1 : line_end].decode("utf-8", "replace"), line_end + 2
    if kind == 0x3A:  # : integer
        return _number(buffer, position + 1, line_end), line_end + 2
    if kind == 0x2D:  # - error
        return ResponseError(buffer[position + 1 : line_end].decode("utf-8", "replace")), line_end + 2
    if kind == 0x2A:  # * array
        return _array(buffer, _number(buffer, position + 1, line_end), line_end + 2, depth)
    raise InvalidResponse(f"a Redis reply starts with {bytes([kind])!r}")


def _array(buffer: bytes, count: int, position: int, depth: int) -> tuple[Any, int]:
    if count < 0:
        return None, position
    if depth >= MAX_DEPTH:
        raise InvalidResponse("a Redis reply nests too deeply")
    items = []
    for _ in range(count):
        if position >= len(buffer):
            return None, _INCOMPLETE
        item, position = _parse(buffer, position, depth + 1)
        if position == _INCOMPLETE:
            return None, _INCOMPLETE
        items.append(item)
    return items, position


def _number(buffer: bytes, start: int, end: int) -> int:
    try:
        return int(buffer[start:end])
    except ValueError:
        raise InvalidResponse(f"a Redis reply holds {buffer[start:end][:40]!r} where a number belongs") from None


__all__ = ["MAX_BULK", "MAX_LINE", "ReplyReader", "encode_command"]

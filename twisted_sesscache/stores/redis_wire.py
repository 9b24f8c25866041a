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

# The longest reply line (a header, a status, an error), bulk reply and array this store accepts:
# records are a few KiB and ROLE lists a few replicas; anything larger means a broken or hostile
# peer, and the connection is dropped. The bounds also keep re-reading a held reply cheap.
MAX_LINE = 4 * 1024
MAX_BULK = 1024 * 1024
MAX_ITEMS = 1024
MAX_DEPTH = 8  # ROLE nests two levels; nothing this store sends nests more


class _Incomplete(Exception):
    """The reply goes on past the bytes held; ``need`` is the buffer length worth reading again at."""

    def __init__(self, need: int) -> None:
        self.need = need


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

    __slots__ = ("_buffer", "_need")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._need = 0  # the held bytes are not read again before there are this many

    def feed(self, data: bytes) -> list[Any]:
        """The replies ``data`` completes, in order.

        Linear in what arrives: a bulk reply's length is in its header, so its
        bytes are read once, when all of them are there; what else may be read
        again is bounded by MAX_LINE and MAX_ITEMS.
        """
        self._buffer += data
        if len(self._buffer) < self._need:
            return []
        buffer = bytes(self._buffer)
        replies: list[Any] = []
        position = 0
        try:
            while position < len(buffer):
                reply, position = _parse(buffer, position, 0)
                replies.append(reply)
            self._need = 0
        except _Incomplete as held:
            self._need = held.need - position
        del self._buffer[:position]
        return replies


def _parse(buffer: bytes, position: int, depth: int) -> tuple[Any, int]:
    """The reply starting at ``position`` and where the next one starts; ``_Incomplete`` if it goes on."""
    line_end = buffer.find(b"\r\n", position, position + MAX_LINE + 2)
    if line_end < 0:
        if len(buffer) - position > MAX_LINE:
            raise InvalidResponse("a Redis reply line is too long")
        raise _Incomplete(len(buffer) + 1)
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
            raise _Incomplete(stop + 2)
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
    if depth >= MAX_DEPTH or count > MAX_ITEMS:
        raise InvalidResponse("a Redis reply nests too deeply or holds too many items")
    items = []
    for _ in range(count):
        if position >= len(buffer):
            raise _Incomplete(position + 1)
        item, position = _parse(buffer, position, depth + 1)
        items.append(item)
    return items, position


def _number(buffer: bytes, start: int, end: int) -> int:
    try:
        return int(buffer[start:end])
    except ValueError:
        raise InvalidResponse(f"a Redis reply holds {buffer[start:end][:40]!r} where a number belongs") from None


__all__ = ["MAX_BULK", "MAX_LINE", "ReplyReader", "encode_command"]

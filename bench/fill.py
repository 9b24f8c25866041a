"""Fill a server session cache with copies of one session, for the flush benchmarks.

A loop in C terms, through the package's own binding to the shared libssl (the
same cffi handles the runtime uses): a handshake, or a Python object, per
session would measure the wrong thing.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from OpenSSL import SSL

from twisted_sesscache._openssl.binding import drain_errors, openssl_version, shared
from twisted_sesscache.exceptions import NeedsSharedOpenSSL


def fill_cache(context: SSL.Context, der: bytes, count: int, created: Callable[[int], int], timeout: int) -> None:
    """Add ``count`` copies of a session to ``context``'s cache, each with a random ID, copy ``i`` made at ``created(i)``."""
    handles = shared()
    if handles is None:
        raise NeedsSharedOpenSSL("Filling a session cache with copies", openssl_version())
    ffi, lib = handles
    pointer = context._context  # pyOpenSSL's SSL_CTX *, which the binding takes as it is
    source = ffi.new("unsigned char[]", der)
    cursor = ffi.new("unsigned char **")
    ids = os.urandom(32 * count)
    for i in range(count):
        cursor[0] = source
        session = lib.d2i_SSL_SESSION(ffi.NULL, cursor, len(der))
        if session == ffi.NULL:
            drain_errors()
            raise ValueError("OpenSSL rejected the template session")
        lib.SSL_SESSION_set1_id(session, ids[32 * i : 32 * i + 32], 32)
        lib.SSL_SESSION_set_time(session, created(i))
        lib.SSL_SESSION_set_timeout(session, timeout)
        lib.SSL_CTX_add_session(pointer, session)
        lib.SSL_SESSION_free(session)  # the cache holds its own reference

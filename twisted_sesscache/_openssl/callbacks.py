"""C entry points OpenSSL calls back into: session-cache callbacks and ticket keys.

Per-context cffi callbacks would be freed with the context's Python object,
possibly before OpenSSL's last call into them; instead each kind has one C
entry point, alive as long as the process-wide access, that dispatches on the
``SSL_CTX`` address to the Python handlers registered for that context.
Everything here needs the shared runtime (``Shared`` handles).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

from OpenSSL import SSL
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_sesscache._openssl.binding import TLS1_3_VERSION, Shared, address, drain_errors, pyffi
from twisted_sesscache.interfaces import ITicketKeySource

NewSessionCallback = Callable[["SSL.Connection | None", SSL.Session], None]
RemoveSessionCallback = Callable[[SSL.Session], None]
GetSessionCallback = Callable[["SSL.Connection | None", bytes], "SSL.Session | None"]

_log = Logger(namespace="twisted_sesscache._openssl.callbacks")


class _Handlers(NamedTuple):
    new: NewSessionCallback | None
    remove: RemoveSessionCallback | None
    get: GetSessionCallback | None


class SessionCallbacks:
    """SSL_CTX_sess_set_new_cb(3), _remove_cb and _get_cb for any number of contexts.

    ``adopt`` turns an ``SSL_SESSION *`` OpenSSL lends into a pyOpenSSL Session
    holding its own reference; ``reference`` turns a Session back into a new
    ``SSL_SESSION *`` reference (OpenSSL's to free once the get callback returns it).
    """

    def __init__(
        self, handles: Shared, adopt: Callable[[Any], SSL.Session], reference: Callable[[SSL.Session], Any]
    ) -> None:
        self._handles = handles
        self._adopt = adopt
        self._reference = reference
        self._by_context: dict[int, _Handlers] = {}
        self._entry_points: tuple[Any, Any, Any] | None = None

    def install(
        self,
        context: SSL.Context,
        new: NewSessionCallback | None,
        remove: RemoveSessionCallback | None,
        get: GetSessionCallback | None,
    ) -> None:
        lib = self._handles.lib
        pointer = context._context
        self._by_context[address(pointer)] = _Handlers(new, remove, get)
        # Dropped before OpenSSL frees the context, so that the removals
        # SSL_CTX_free reports find no handler rather than a dead one.
        weakref.finalize(context, self._by_context.pop, address(pointer), None)
        on_new, on_remove, on_get = self._trampolines()
        if new is not None:
            lib.SSL_CTX_sess_set_new_cb(pointer, on_new)
        if remove is not None:
            lib.SSL_CTX_sess_set_remove_cb(pointer, on_remove)
        if get is not None:
            lib.SSL_CTX_sess_set_get_cb(pointer, on_get)

    def _trampolines(self) -> tuple[Any, Any, Any]:
        """The three C entry points, made on first use and kept."""
        if self._entry_points is not None:
            return self._entry_points
        ffi, lib = self._handles

        def handlers_of_ssl(ssl: Any) -> _Handlers | None:
            return self._by_context.get(address(lib.SSL_get_SSL_CTX(ssl)))

        def on_new(ssl: Any, pointer: Any) -> int:
            handlers = handlers_of_ssl(ssl)
            if handlers is not None and handlers.new is not None:
                handlers.new(_connection_of(ssl), self._adopt(pointer))
            return 0  # OpenSSL keeps its own reference; adopt took ours

        def on_remove(ctx: Any, pointer: Any) -> None:
            handlers = self._by_context.get(address(ctx))
            if handlers is not None and handlers.remove is not None:
                handlers.remove(self._adopt(pointer))

        def on_get(ssl: Any, data: Any, length: int, copy: Any) -> Any:
            copy[0] = 0  # the session handed back is OpenSSL's to free
            handlers = handlers_of_ssl(ssl)
            if handlers is None or handlers.get is None:
                return ffi.NULL
            session = handlers.get(_connection_of(ssl), pyffi.buffer(data, length)[:])
            return self._reference(session) if session is not None else ffi.NULL

        self._entry_points = (
            ffi.callback("int(void *, void *)", on_new, error=0, onerror=report),
            ffi.callback("void(void *, void *)", on_remove, onerror=report),
            ffi.callback("void *(void *, const unsigned char *, int, int *)", on_get, error=ffi.NULL, onerror=report),
        )
        return self._entry_points


class TicketKeyCallback:
    """SSL_CTX_set_tlsext_ticket_key_evp_cb(3) for any number of contexts, each with its key source."""

    def __init__(self, handles: Shared) -> None:
        self._handles = handles
        self._by_context: dict[int, ITicketKeySource] = {}
        self._entry_point: Any = None
        # The OSSL_PARAMs that set each HMAC key, made once per key (a few dozen at most).
        self._mac_params: dict[bytes, tuple[Any, ...]] = {}

    def install(self, context: SSL.Context, keys: ITicketKeySource) -> None:
        pointer = context._context
        self._by_context[address(pointer)] = keys
        weakref.finalize(context, self._by_context.pop, address(pointer), None)
        if self._handles.lib.SSL_CTX_set_tlsext_ticket_key_evp_cb(pointer, self._trampoline()) != 1:
            raise RuntimeError("OpenSSL refused the ticket key callback")

    def _trampoline(self) -> Any:
        if self._entry_point is not None:
            return self._entry_point
        ffi, lib = self._handles
        # Fetched once: the legacy EVP_aes_256_cbc() makes OpenSSL 3 fetch it again on every init.
        cipher = lib.EVP_CIPHER_fetch(ffi.NULL, b"AES-256-CBC", ffi.NULL)
        if cipher == ffi.NULL:
            drain_errors()
            cipher = lib.EVP_aes_256_cbc()
        cached = self._mac_params

        def mac_params(hmac_key: bytes) -> Any:
            params = cached.get(hmac_key)
            if params is None:
                if len(cached) >= _MAX_MAC_PARAMS:
                    cached.clear()
                params = cached[hmac_key] = _mac_params(ffi, hmac_key)
            return params[0]

        def on_ticket(ssl: Any, name: Any, iv: Any, cipher_ctx: Any, mac_ctx: Any, enc: int) -> int:
            keys = self._by_context.get(address(lib.SSL_get_SSL_CTX(ssl)))
            if keys is None:
                return 0
            if enc:
                key = keys.current()
                if key is None:
                    return 0  # no shared key yet: issue no ticket
                pyffi.memmove(name, key.name, 16)
                pyffi.memmove(iv, os.urandom(16), 16)
                renew = False
                init = lib.EVP_EncryptInit_ex
            else:
                found = keys.find(pyffi.buffer(name, 16)[:])
                if found is None:
                    return 0  # unknown key: full handshake, new ticket
                key, current = found
                # TLS 1.3 clients use each ticket once, and OpenSSL sends a new one
                # only when asked: always renew there; TLS 1.2 renews old keys' tickets.
                renew = not current or lib.SSL_version(ssl) >= TLS1_3_VERSION
                init = lib.EVP_DecryptInit_ex
            if lib.EVP_MAC_CTX_set_params(mac_ctx, mac_params(key.hmac)) != 1 or init(cipher_ctx, cipher, ffi.NULL, key.aes, iv) != 1:
                drain_errors()
                return -1
            return 2 if renew else 1  # 2: OpenSSL renews the ticket (TLS 1.3 needs the ask)

        self._entry_point = ffi.callback(
            "int(void *, unsigned char *, unsigned char *, void *, void *, int)", on_ticket, error=-1, onerror=report
        )
        return self._entry_point


_MAX_MAC_PARAMS = 64  # more keys than any window holds (MAX_WINDOW + 2)


def _mac_params(ffi: Any, hmac_key: bytes) -> tuple[Any, ...]:
    """OSSL_PARAMs setting an HMAC-SHA256 key; the buffers must outlive the call."""
    key_buffer = ffi.new("unsigned char[]", hmac_key)
    names = ffi.new("char[]", b"key"), ffi.new("char[]", b"digest"), ffi.new("char[]", b"SHA256")
    params = ffi.new("OSSL_PARAM[3]")
    params[0] = (names[0], 5, key_buffer, len(hmac_key), ffi.cast("size_t", -1))
    params[1] = (names[1], 4, names[2], 6, ffi.cast("size_t", -1))
    return params, key_buffer, names


def _connection_of(ssl: Any) -> SSL.Connection | None:
    """The pyOpenSSL Connection that owns an ``SSL *`` (pyOpenSSL keeps the map, privately)."""
    return SSL.Connection._reverse_mapping.get(pyffi.cast("SSL *", ssl))  # type: ignore[attr-defined]


def report(exception_type: type[BaseException], value: BaseException, traceback: Any) -> None:
    """cffi's onerror: log what escaped a callback; the handshake goes on without it."""
    _log.failure(
        "Session-cache callback failed; the handshake goes on without it",
        Failure(value, exception_type, traceback),
    )


__all__ = [
    "GetSessionCallback",
    "NewSessionCallback",
    "RemoveSessionCallback",
    "SessionCallbacks",
    "TicketKeyCallback",
    "report",
]

"""The one place that touches OpenSSL below pyOpenSSL.

pyOpenSSL exposes only part of OpenSSL's session-cache API. When pyOpenSSL is
linked against a shared ``libssl`` (distribution packages), the rest can be
called through cffi in ABI mode on the very same ``SSL_CTX`` pointers. When it
runs on cryptography's wheel, OpenSSL is a private static copy: calling the
system library on its pointers would crash, so those calls are refused with
:class:`NeedsSharedOpenSSL`. Which of the two applies is decided once, here,
by comparing the address of a string inside both libraries.
"""

from __future__ import annotations

import ctypes.util
import os
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from OpenSSL import SSL
from twisted.python.failure import Failure
from OpenSSL._util import ffi as _pyffi, lib as _pylib

from twisted_sesscache.exceptions import NeedsSharedOpenSSL
from twisted_sesscache.interfaces import ITicketKeySource as TicketKeySource, TicketKey

SHARED = "shared-openssl"
BUNDLED = "bundled-openssl"

# SSL_CTX_ctrl commands (openssl/ssl.h, stable from 1.1.1 to 4.0).
_CTRL_SET_SESS_CACHE_SIZE = 42
_CTRL_GET_SESS_CACHE_SIZE = 43
_CTRL_GET_MAX_PROTO_VERSION = 131
_TLS1_3_VERSION = 0x0304
COUNTERS: dict[str, int] = {
    "number": 20,
    "connect": 21,
    "connect_good": 22,
    "connect_renegotiate": 23,
    "accept": 24,
    "accept_good": 25,
    "accept_renegotiate": 26,
    "hits": 27,
    "cb_hits": 28,
    "misses": 29,
    "timeouts": 30,
    "cache_full": 31,
}

_CDEF = """
const char *OpenSSL_version(int t);
long SSL_CTX_ctrl(void *ctx, int cmd, long larg, void *parg);
void SSL_CTX_flush_sessions(void *ctx, long tm);
int SSL_CTX_add_session(void *ctx, void *session);
int SSL_CTX_remove_session(void *ctx, void *session);
uint64_t SSL_CTX_clear_options(void *ctx, uint64_t options);
long SSL_SESSION_get_time(const void *session);
long SSL_SESSION_get_timeout(const void *session);
const unsigned char *SSL_SESSION_get_id(const void *session, unsigned int *len);
void SSL_CTX_sess_set_new_cb(void *ctx, int (*cb)(void *ssl, void *session));
void SSL_CTX_sess_set_remove_cb(void *ctx, void (*cb)(void *ctx, void *session));
void SSL_CTX_sess_set_get_cb(void *ctx,
    void *(*cb)(void *ssl, const unsigned char *id, int len, int *copy));
void *SSL_get_SSL_CTX(const void *ssl);
int SSL_SESSION_up_ref(void *session);
void SSL_SESSION_free(void *session);
void *d2i_SSL_SESSION(void **a, unsigned char **pp, long length);
int i2d_SSL_SESSION(void *session, unsigned char **pp);
int SSL_SESSION_set1_id(void *s, const unsigned char *sid, unsigned int sid_len);
long SSL_SESSION_set_time(void *s, long t);
long SSL_SESSION_set_timeout(void *s, long t);
typedef struct ossl_param_st {
    const char *key; unsigned int data_type; void *data; size_t data_size; size_t return_size;
} OSSL_PARAM;
int SSL_CTX_set_tlsext_ticket_key_evp_cb(void *ctx,
    int (*cb)(void *ssl, unsigned char *name, unsigned char *iv, void *cipher, void *mac, int enc));
const void *EVP_aes_256_cbc(void);
int EVP_EncryptInit_ex(void *ctx, const void *cipher, void *engine, const unsigned char *key, const unsigned char *iv);
int EVP_DecryptInit_ex(void *ctx, const void *cipher, void *engine, const unsigned char *key, const unsigned char *iv);
int EVP_MAC_CTX_set_params(void *ctx, const OSSL_PARAM *params);
"""


def openssl_version() -> str:
    """The OpenSSL that pyOpenSSL runs on, as it names itself."""
    return _pyffi.string(_pylib.OpenSSL_version(0)).decode("ascii", "replace")


def _open_shared() -> tuple[Any, Any] | None:
    """cffi handles on the system libssl, if it is the one pyOpenSSL uses."""
    try:
        import cffi
    except ImportError:
        return None
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    for ssl_name in ("libssl.so.3", ctypes.util.find_library("ssl"), "libssl.so.1.1"):
        if not ssl_name:
            continue
        try:
            libssl = ffi.dlopen(ssl_name)
            theirs = int(ffi.cast("uintptr_t", libssl.OpenSSL_version(0)))
        except (OSError, AttributeError):
            continue
        ours = int(_pyffi.cast("uintptr_t", _pylib.OpenSSL_version(0)))
        if theirs == ours:
            return ffi, libssl
    return None


class OpenSSLAccess:
    """Session-cache calls on pyOpenSSL objects, whichever runtime is active.

    Methods that work everywhere use pyOpenSSL's own binding; the others go to
    the shared ``libssl`` or raise :class:`NeedsSharedOpenSSL`.
    """

    def __init__(self, shared: tuple[Any, Any] | None) -> None:
        self.name = SHARED if shared else BUNDLED
        self.version = openssl_version()
        self._ffi, self._lib = shared if shared else (None, None)
        self._handlers: dict[int, _Handlers] = {}
        self._callbacks: tuple[Any, Any, Any] | None = None
        self._ticket_keys: dict[int, TicketKeySource] = {}
        self._ticket_callback: Any = None

    @property
    def shared(self) -> bool:
        return self._lib is not None

    def describe(self) -> str:
        """One line for logs and ``--version``: runtime and what it cannot do."""
        if self.shared:
            return f"{self.name} ({self.version}): every session-cache feature is available"
        return (
            f"{self.name} ({self.version}): flush, add/remove, cache size, "
            "OpenSSL's own counters and the server-side external store are "
            "unavailable: they need pyOpenSSL on the system libssl"
        )

    # -- helpers ---------------------------------------------------------

    def _need(self, operation: str) -> Any:
        if self._lib is None:
            raise NeedsSharedOpenSSL(operation, self.version)
        return self._lib

    def _ptr(self, cdata: Any) -> Any:
        """pyOpenSSL's cdata pointer, retyped for our cffi instance."""
        return self._ffi.cast("void *", int(_pyffi.cast("uintptr_t", cdata)))

    # -- everywhere ------------------------------------------------------

    def context_options(self, context: SSL.Context) -> int:
        # Read, not set(0): pyOpenSSL 25+ refuses setters on a context that made a connection.
        return int(_pylib.SSL_CTX_get_options(context._context))

    def allow_tickets(self, context: SSL.Context, allow: bool) -> None:
        """Turn stateless tickets on or off (off: TLS 1.3 tickets are stateful)."""
        if not allow:
            context.set_options(SSL.OP_NO_TICKET)
        elif self.context_options(context) & SSL.OP_NO_TICKET:
            if self._lib is None:
                raise NeedsSharedOpenSSL(
                    "Re-enabling tickets on a context made with OP_NO_TICKET "
                    "(pass CertificateOptions(enableSessionTickets=True) instead)",
                    self.version,
                )
            self._lib.SSL_CTX_clear_options(self._ptr(context._context), SSL.OP_NO_TICKET)

    def ignore_unexpected_eof(self, connection: SSL.Connection) -> None:
        """Keep this one connection's session alive when the peer skips close_notify."""
        _pylib.SSL_set_options(connection._ssl, SSL.OP_IGNORE_UNEXPECTED_EOF)

    def session_to_der(self, session: SSL.Session) -> bytes:
        """i2d_SSL_SESSION: the session as OpenSSL serialises it."""
        if self.shared:
            ffi, lib, pointer = self._ffi, self._lib, self._ptr(session._session)
        else:
            ffi, lib, pointer = _pyffi, _pylib, session._session
        length = lib.i2d_SSL_SESSION(pointer, ffi.NULL)
        if length <= 0:
            raise ValueError("OpenSSL could not encode the session")
        buffer = ffi.new("unsigned char[]", length)
        cursor = ffi.new("unsigned char **", buffer)
        lib.i2d_SSL_SESSION(pointer, cursor)
        return bytes(ffi.buffer(buffer, length))

    def session_from_der(self, der: bytes) -> SSL.Session:
        """d2i_SSL_SESSION; ValueError for bytes OpenSSL rejects."""
        pointer = self._decode_session(der)
        if self.shared:
            session = self._adopt(pointer)
            self._lib.SSL_SESSION_free(pointer)  # _adopt took its own reference
            return session
        session = SSL.Session.__new__(SSL.Session)
        session._session = _pyffi.gc(pointer, _pylib.SSL_SESSION_free)
        return session

    def _decode_session(self, der: bytes) -> Any:
        """A new SSL_SESSION reference (the caller owns it) from DER bytes."""
        ffi, lib = (self._ffi, self._lib) if self.shared else (_pyffi, _pylib)
        source = ffi.new("unsigned char[]", der)
        cursor = ffi.new("unsigned char **", source)
        pointer = lib.d2i_SSL_SESSION(ffi.NULL, cursor, len(der))
        if pointer == ffi.NULL:
            _drain_errors()
            raise ValueError("OpenSSL rejected the session bytes")
        return pointer

    def offer_session(self, connection: SSL.Connection, session: SSL.Session) -> None:
        """SSL_set_session(3) for a client connection, before its handshake.

        pyOpenSSL 25+ lets ``Connection.set_session`` take only a session made
        through the very same ``Context`` object; OpenSSL asks only for a
        compatible one, which the client side's session keys guarantee.
        """
        if _pylib.SSL_set_session(connection._ssl, session._session) != 1:
            _drain_errors()
            raise SSL.Error([("SSL routines", "SSL_set_session", "session refused")])

    def session_reused(self, connection: SSL.Connection) -> bool:
        return bool(_pylib.SSL_session_reused(connection._ssl))

    def session_identity(self, session: SSL.Session) -> int:
        """The address of the ``SSL_SESSION``: equal only for the same object."""
        return int(_pyffi.cast("uintptr_t", session._session))

    def current_session_identity(self, connection: SSL.Connection) -> int:
        """The address of the connection's session, without taking a reference."""
        return int(_pyffi.cast("uintptr_t", _pylib.SSL_get_session(connection._ssl)))

    # -- shared runtime only ----------------------------------------------

    def set_cache_size(self, context: SSL.Context, size: int) -> None:
        lib = self._need("A session cache size limit")
        lib.SSL_CTX_ctrl(self._ptr(context._context), _CTRL_SET_SESS_CACHE_SIZE, size, self._ffi.NULL)

    def cache_size(self, context: SSL.Context) -> int:
        lib = self._need("Reading the session cache size")
        return int(lib.SSL_CTX_ctrl(self._ptr(context._context), _CTRL_GET_SESS_CACHE_SIZE, 0, self._ffi.NULL))

    def counters(self, context: SSL.Context) -> dict[str, int]:
        """OpenSSL's SSL_CTX_sess_* statistics for one context."""
        lib = self._need("OpenSSL's session statistics")
        pointer = self._ptr(context._context)
        return {
            name: int(lib.SSL_CTX_ctrl(pointer, command, 0, self._ffi.NULL))
            for name, command in COUNTERS.items()
        }

    def allows_tls13(self, context: SSL.Context) -> bool:
        """Whether the context may negotiate TLS 1.3 (then a hello's legacy session ID is noise)."""
        if self.context_options(context) & getattr(SSL, "OP_NO_TLSv1_3", 0):
            return False
        lib = self._need("Reading the protocol version bounds")
        highest = lib.SSL_CTX_ctrl(self._ptr(context._context), _CTRL_GET_MAX_PROTO_VERSION, 0, self._ffi.NULL)
        return highest == 0 or highest >= _TLS1_3_VERSION

    def flush(self, context: SSL.Context, now: int) -> None:
        """SSL_CTX_flush_sessions(3): drop sessions expired at ``now``."""
        lib = self._need("Flushing expired sessions")
        lib.SSL_CTX_flush_sessions(self._ptr(context._context), now)

    def add_session(self, context: SSL.Context, session: SSL.Session) -> bool:
        lib = self._need("Adding a session to the cache")
        return bool(lib.SSL_CTX_add_session(self._ptr(context._context), self._ptr(session._session)))

    def remove_session(self, context: SSL.Context, session: SSL.Session) -> bool:
        lib = self._need("Removing a session from the cache")
        return bool(lib.SSL_CTX_remove_session(self._ptr(context._context), self._ptr(session._session)))

    def fill_cache(
        self, context: SSL.Context, der: bytes, count: int, created: Callable[[int], int], timeout: int
    ) -> None:
        """Add ``count`` copies of a session, each with a random ID, copy ``i`` made at ``created(i)``.

        For benchmarks and tests of large caches: a loop in C terms, since a
        handshake (or a Python object) per session would measure the wrong thing.
        """
        lib = self._need("Filling a session cache with copies")
        ffi, pointer = self._ffi, self._ptr(context._context)
        source = ffi.new("unsigned char[]", der)
        cursor = ffi.new("unsigned char **")
        ids = os.urandom(32 * count)
        for i in range(count):
            cursor[0] = source
            session = lib.d2i_SSL_SESSION(ffi.NULL, cursor, len(der))
            if session == ffi.NULL:
                _drain_errors()
                raise ValueError("OpenSSL rejected the template session")
            lib.SSL_SESSION_set1_id(session, ids[32 * i : 32 * i + 32], 32)
            lib.SSL_SESSION_set_time(session, created(i))
            lib.SSL_SESSION_set_timeout(session, timeout)
            lib.SSL_CTX_add_session(pointer, session)
            lib.SSL_SESSION_free(session)  # the cache holds its own reference

    def session_id(self, session: SSL.Session) -> bytes:
        lib = self._need("Reading a session ID")
        length = self._ffi.new("unsigned int *")
        data = lib.SSL_SESSION_get_id(self._ptr(session._session), length)
        return bytes(self._ffi.buffer(data, length[0]))

    def session_expiry(self, session: SSL.Session) -> int:
        """When the session stops being resumable, in seconds since the epoch."""
        lib = self._need("Reading a session's lifetime")
        pointer = self._ptr(session._session)
        return int(lib.SSL_SESSION_get_time(pointer) + lib.SSL_SESSION_get_timeout(pointer))

    def set_session_callbacks(
        self,
        context: SSL.Context,
        *,
        new: NewSessionCallback | None = None,
        remove: RemoveSessionCallback | None = None,
        get: GetSessionCallback | None = None,
    ) -> None:
        """SSL_CTX_sess_set_new_cb(3) and friends, in Python terms.

        ``new`` sees each session OpenSSL makes (server sessions, and client
        sessions when the client cache mode is on); ``remove`` each session the
        internal cache drops (flush, eviction, invalidation); ``get`` answers a
        server lookup for a session ID with the session's DER bytes, or None.
        Callbacks must not raise; anything that escapes is logged and the
        handshake continues as if the callback had found nothing.
        """
        lib = self._need("External session-cache callbacks")
        pointer = self._ptr(context._context)
        address = int(self._ffi.cast("uintptr_t", pointer))
        self._handlers[address] = _Handlers(new, remove, get)
        # Dropped before OpenSSL frees the context, so that the removals
        # SSL_CTX_free reports find no handler rather than a dead one.
        weakref.finalize(context, self._handlers.pop, address, None)
        trampolines = self._trampolines()
        if new is not None:
            lib.SSL_CTX_sess_set_new_cb(pointer, trampolines[0])
        if remove is not None:
            lib.SSL_CTX_sess_set_remove_cb(pointer, trampolines[1])
        if get is not None:
            lib.SSL_CTX_sess_set_get_cb(pointer, trampolines[2])

    def set_ticket_keys(self, context: SSL.Context, keys: TicketKeySource) -> None:
        """SSL_CTX_set_tlsext_ticket_key_evp_cb(3): tickets sealed with keys this process shares.

        ``keys.current()`` names the key new tickets use (None: issue none);
        ``keys.find(name)`` returns ``(key, is_current)`` for a ticket's key
        name, or None, so tickets from any process holding the same keys
        resume here, and those under an older key are renewed.
        """
        lib = self._need("Shared TLS ticket keys")
        pointer = self._ptr(context._context)
        address = int(self._ffi.cast("uintptr_t", pointer))
        self._ticket_keys[address] = keys
        weakref.finalize(context, self._ticket_keys.pop, address, None)
        if lib.SSL_CTX_set_tlsext_ticket_key_evp_cb(pointer, self._ticket_trampoline()) != 1:
            raise RuntimeError("OpenSSL refused the ticket key callback")

    def _ticket_trampoline(self) -> Any:
        if self._ticket_callback is not None:
            return self._ticket_callback
        ffi, lib = self._ffi, self._lib
        cipher = lib.EVP_aes_256_cbc()

        def mac_params(hmac_key: bytes) -> tuple[Any, ...]:
            key_buffer = ffi.new("unsigned char[]", hmac_key)
            names = ffi.new("char[]", b"key"), ffi.new("char[]", b"digest"), ffi.new("char[]", b"SHA256")
            params = ffi.new("OSSL_PARAM[3]")
            params[0] = (names[0], 5, key_buffer, len(hmac_key), ffi.cast("size_t", -1))
            params[1] = (names[1], 4, names[2], 6, ffi.cast("size_t", -1))
            return params, key_buffer, names  # the buffers must outlive the call

        def on_ticket(ssl: Any, name: Any, iv: Any, cipher_ctx: Any, mac_ctx: Any, enc: int) -> int:
            keys = self._ticket_keys.get(int(ffi.cast("uintptr_t", lib.SSL_get_SSL_CTX(ssl))))
            if keys is None:
                return 0
            if enc:
                key = keys.current()
                if key is None:
                    return 0  # no shared key yet: issue no ticket
                ffi.memmove(name, key.name, 16)
                ffi.memmove(iv, os.urandom(16), 16)
                renew = False
                init = lib.EVP_EncryptInit_ex
            else:
                found = keys.find(bytes(ffi.buffer(name, 16)))
                if found is None:
                    return 0  # unknown key: full handshake, new ticket
                key, current = found
                renew = not current
                init = lib.EVP_DecryptInit_ex
            params = mac_params(key.hmac)
            if lib.EVP_MAC_CTX_set_params(mac_ctx, params[0]) != 1 or init(cipher_ctx, cipher, ffi.NULL, key.aes, iv) != 1:
                _drain_errors()
                return -1
            return 2 if renew else 1

        self._ticket_callback = ffi.callback(
            "int(void *, unsigned char *, unsigned char *, void *, void *, int)", on_ticket, error=-1, onerror=_report
        )
        return self._ticket_callback

    def _trampolines(self) -> tuple[Any, Any, Any]:
        """One C entry point per callback kind, alive as long as this object.

        Per-context cffi callbacks would be freed with the context's Python
        object, possibly before OpenSSL's last call into them; these dispatch
        on the ``SSL_CTX`` address instead.
        """
        if self._callbacks is not None:
            return self._callbacks
        ffi, lib = self._ffi, self._lib

        def handlers_of_ssl(ssl: Any) -> _Handlers | None:
            return self._handlers.get(int(ffi.cast("uintptr_t", lib.SSL_get_SSL_CTX(ssl))))

        def on_new(ssl: Any, pointer: Any) -> int:
            handlers = handlers_of_ssl(ssl)
            if handlers is not None and handlers.new is not None:
                handlers.new(_connection_of(ffi, ssl), self._adopt(pointer))
            return 0  # OpenSSL keeps its own reference; _adopt took ours

        def on_remove(ctx: Any, pointer: Any) -> None:
            handlers = self._handlers.get(int(ffi.cast("uintptr_t", ctx)))
            if handlers is not None and handlers.remove is not None:
                handlers.remove(self._adopt(pointer))

        def on_get(ssl: Any, data: Any, length: int, copy: Any) -> Any:
            copy[0] = 0  # the session handed back is OpenSSL's to free
            handlers = handlers_of_ssl(ssl)
            if handlers is None or handlers.get is None:
                return ffi.NULL
            der = handlers.get(_connection_of(ffi, ssl), bytes(ffi.buffer(data, length)))
            return self._decode_session(der) if der else ffi.NULL

        self._callbacks = (
            ffi.callback("int(void *, void *)", on_new, error=0, onerror=_report),
            ffi.callback("void(void *, void *)", on_remove, onerror=_report),
            ffi.callback("void *(void *, const unsigned char *, int, int *)", on_get, error=ffi.NULL, onerror=_report),
        )
        return self._callbacks

    def _adopt(self, pointer: Any) -> SSL.Session:
        """A pyOpenSSL Session holding its own reference to an SSL_SESSION."""
        self._lib.SSL_SESSION_up_ref(pointer)
        session = SSL.Session.__new__(SSL.Session)
        session._session = _pyffi.gc(
            _pyffi.cast("SSL_SESSION *", int(self._ffi.cast("uintptr_t", pointer))), _pylib.SSL_SESSION_free
        )
        return session


NewSessionCallback = Callable[["SSL.Connection | None", SSL.Session], None]
RemoveSessionCallback = Callable[[SSL.Session], None]
GetSessionCallback = Callable[["SSL.Connection | None", bytes], "bytes | None"]


class _Handlers(NamedTuple):
    new: NewSessionCallback | None
    remove: RemoveSessionCallback | None
    get: GetSessionCallback | None


def _connection_of(ffi: Any, ssl: Any) -> SSL.Connection | None:
    """The pyOpenSSL Connection that owns an ``SSL *`` (pyOpenSSL keeps the map)."""
    key = _pyffi.cast("SSL *", int(ffi.cast("uintptr_t", ssl)))
    return SSL.Connection._reverse_mapping.get(key)  # type: ignore[attr-defined, no-any-return]


def _report(exception_type: type[BaseException], value: BaseException, traceback: Any) -> None:
    from twisted.logger import Logger

    Logger(namespace="twisted_sesscache._openssl.access").failure(
        "Session-cache callback failed; the handshake goes on without it",
        Failure(value, exception_type, traceback),
    )


def _drain_errors() -> None:
    """Leave no stale entry on OpenSSL's error queue for the next call to trip on."""
    while _pylib.ERR_get_error():
        pass



__all__: list[str] = ["BUNDLED", "COUNTERS", "NeedsSharedOpenSSL", "OpenSSLAccess", "SHARED"]

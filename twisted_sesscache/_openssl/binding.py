"""The cffi binding to the system libssl, and the check that it is pyOpenSSL's.

pyOpenSSL exposes only part of OpenSSL's session-cache API. When pyOpenSSL is
linked against a shared ``libssl`` (distribution packages), the rest can be
called through cffi in ABI mode on the very same ``SSL_CTX`` pointers. When it
runs on cryptography's wheel, OpenSSL is a private static copy: calling the
system library on its pointers would crash, so :func:`shared` answers None.
Which of the two applies is decided once, on the first call, by comparing the
address of a string inside both libraries; importing this module opens nothing.
"""

from __future__ import annotations

import ctypes.util
import threading
from typing import Any, NamedTuple

# pyOpenSSL's own cffi handles on whichever OpenSSL it runs on (a private
# module, the only way to its raw binding); every module of _openssl uses these.
from OpenSSL._util import ffi as _ffi, lib as _lib  # type: ignore[import-untyped]

pyffi: Any = _ffi
pylib: Any = _lib

SHARED = "shared-openssl"
BUNDLED = "bundled-openssl"

# SSL_CTX_ctrl commands (openssl/ssl.h, stable from 1.1.1 to 4.0).
CTRL_SET_SESS_CACHE_SIZE = 42
CTRL_GET_MAX_PROTO_VERSION = 131
TLS1_3_VERSION = 0x0304
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

CDEF = """
const char *OpenSSL_version(int t);
long SSL_CTX_ctrl(void *ctx, int cmd, long larg, void *parg);
void SSL_CTX_flush_sessions(void *ctx, long tm);
int SSL_CTX_add_session(void *ctx, void *session);
int SSL_CTX_remove_session(void *ctx, void *session);
uint64_t SSL_CTX_clear_options(void *ctx, uint64_t options);
long SSL_SESSION_get_time(const void *session);
long SSL_SESSION_get_timeout(const void *session);
const unsigned char *SSL_SESSION_get_id(const void *session, unsigned int *len);
int SSL_SESSION_get_protocol_version(const void *session);
void SSL_CTX_sess_set_new_cb(void *ctx, int (*cb)(void *ssl, void *session));
void SSL_CTX_sess_set_remove_cb(void *ctx, void (*cb)(void *ctx, void *session));
void SSL_CTX_sess_set_get_cb(void *ctx,
    void *(*cb)(void *ssl, const unsigned char *id, int len, int *copy));
void *SSL_get_SSL_CTX(const void *ssl);
int SSL_version(const void *ssl);
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
void *EVP_CIPHER_fetch(void *libctx, const char *algorithm, const char *properties);
int EVP_EncryptInit_ex(void *ctx, const void *cipher, void *engine, const unsigned char *key, const unsigned char *iv);
int EVP_DecryptInit_ex(void *ctx, const void *cipher, void *engine, const unsigned char *key, const unsigned char *iv);
int EVP_MAC_CTX_set_params(void *ctx, const OSSL_PARAM *params);
"""


class Shared(NamedTuple):
    """cffi handles on the system libssl, proven to be the library pyOpenSSL uses.

    CDEF declares every OpenSSL object ``void *``, and cffi passes any pointer
    made by the one ``_cffi_backend`` as a ``void *``: pyOpenSSL's pointers go
    into ``lib`` as they are, and what ``lib`` returns is cast to pyOpenSSL's
    types with ``pyffi``. Buffers and casts are made with ``pyffi`` too: its
    methods are C, those of this ABI-mode ``ffi`` are Python (cffi's api.py),
    a few hundred nanoseconds each, on every connection.
    """

    ffi: Any
    lib: Any


_lock = threading.Lock()
_looked_up = False
_handles: Shared | None = None


def shared() -> Shared | None:
    """The shared libssl, or None under a private OpenSSL; looked up once per process."""
    global _looked_up, _handles
    with _lock:
        if not _looked_up:
            _handles = open_shared()
            _looked_up = True
        return _handles


def looked_up() -> bool:
    """Whether :func:`shared` has run (importing the package must not run it)."""
    return _looked_up


def open_shared() -> Shared | None:
    """Open the system libssl if it is the one pyOpenSSL uses (else None: a private copy)."""
    try:
        import cffi
    except ImportError:
        return None
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ours = address(pylib.OpenSSL_version(0))
    for ssl_name in ("libssl.so.3", ctypes.util.find_library("ssl"), "libssl.so.1.1"):
        if not ssl_name:
            continue
        try:
            libssl: Any = ffi.dlopen(ssl_name)
            theirs = int(ffi.cast("uintptr_t", libssl.OpenSSL_version(0)))
        except (OSError, AttributeError):
            continue
        if theirs == ours:  # one string, one library: pointers may cross
            return Shared(ffi, libssl)
    return None


def address(cdata: Any) -> int:
    """The address of a cdata pointer, whichever ffi made it."""
    return int(pyffi.cast("uintptr_t", cdata))


def openssl_version() -> str:
    """The OpenSSL that pyOpenSSL runs on, as it names itself."""
    return str(pyffi.string(pylib.OpenSSL_version(0)).decode("ascii", "replace"))


def drain_errors() -> None:
    """Leave no stale entry on OpenSSL's error queue for the next call to trip on."""
    while pylib.ERR_get_error():
        pass


__all__ = [
    "BUNDLED",
    "CDEF",
    "COUNTERS",
    "CTRL_GET_MAX_PROTO_VERSION",
    "CTRL_SET_SESS_CACHE_SIZE",
    "SHARED",
    "TLS1_3_VERSION",
    "Shared",
    "address",
    "drain_errors",
    "looked_up",
    "open_shared",
    "openssl_version",
    "pyffi",
    "pylib",
    "shared",
]

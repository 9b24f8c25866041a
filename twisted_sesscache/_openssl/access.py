"""Session-cache operations on pyOpenSSL objects, whichever OpenSSL is underneath.

What pyOpenSSL's own binding can do works in both runtimes; the rest goes to
the shared ``libssl`` (:mod:`twisted_sesscache._openssl.binding`) or raises
:class:`NeedsSharedOpenSSL`, one clear error naming the fix. The pyOpenSSL
private attributes this needs (``Context._context``, ``Connection._ssl``,
``Session._session``) are read here and in the other modules of ``_openssl``
only.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL

from twisted_sesscache._openssl.binding import (
    BUNDLED,
    COUNTERS,
    CTRL_GET_MAX_PROTO_VERSION,
    CTRL_SET_SESS_CACHE_SIZE,
    SHARED,
    TLS1_3_VERSION,
    Shared,
    address,
    drain_errors,
    openssl_version,
    pyffi,
    pylib,
)
from twisted_sesscache._openssl.callbacks import (
    GetSessionCallback,
    NewSessionCallback,
    RemoveSessionCallback,
    SessionCallbacks,
    TicketKeyCallback,
)
from twisted_sesscache.exceptions import NeedsSharedOpenSSL
from twisted_sesscache.interfaces import ITicketKeySource


class OpenSSLAccess:
    """Session-cache calls on pyOpenSSL objects, whichever runtime is active.

    Methods that work everywhere use pyOpenSSL's own binding; the others go to
    the shared ``libssl`` or raise :class:`NeedsSharedOpenSSL`.
    """

    def __init__(self, shared: Shared | None) -> None:
        self.name = SHARED if shared else BUNDLED
        self.version = openssl_version()
        self._handles = shared
        self._lib: Any = shared.lib if shared else None
        self._session_callbacks: SessionCallbacks | None = None
        self._ticket_callback: TicketKeyCallback | None = None

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

    # -- everywhere ------------------------------------------------------

    def context_options(self, context: SSL.Context) -> int:
        # Read, not set(0): pyOpenSSL 25+ refuses setters on a context that made a connection.
        return int(pylib.SSL_CTX_get_options(context._context))

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
            self._lib.SSL_CTX_clear_options(context._context, SSL.OP_NO_TICKET)

    def ignore_unexpected_eof(self, connection: SSL.Connection) -> None:
        """Keep this one connection's session alive when the peer skips close_notify."""
        pylib.SSL_set_options(connection._ssl, OP_IGNORE_UNEXPECTED_EOF)

    def session_to_der(self, session: SSL.Session) -> bytes:
        """i2d_SSL_SESSION: the session as OpenSSL serialises it."""
        lib = self._lib if self.shared else pylib
        pointer = _session_of(session)
        length = lib.i2d_SSL_SESSION(pointer, pyffi.NULL)
        if length <= 0:
            raise ValueError("OpenSSL could not encode the session")
        buffer = pyffi.new("unsigned char[]", length)
        lib.i2d_SSL_SESSION(pointer, pyffi.new("unsigned char **", buffer))
        return pyffi.buffer(buffer, length)[:]

    def session_from_der(self, der: bytes) -> SSL.Session:
        """d2i_SSL_SESSION; ValueError for bytes OpenSSL rejects."""
        pointer = pyffi.cast("SSL_SESSION *", self._decode_session(der))
        return _session_holding(pyffi.gc(pointer, pylib.SSL_SESSION_free))

    def _decode_session(self, der: bytes) -> Any:
        """A new SSL_SESSION reference (the caller owns it) from DER bytes."""
        lib = self._lib if self.shared else pylib
        source = pyffi.new("unsigned char[]", der)
        pointer = lib.d2i_SSL_SESSION(pyffi.NULL, pyffi.new("unsigned char **", source), len(der))
        if pointer == pyffi.NULL:
            drain_errors()
            raise ValueError("OpenSSL rejected the session bytes")
        return pointer

    def offer_session(self, connection: SSL.Connection, session: SSL.Session) -> None:
        """SSL_set_session(3) for a client connection, before its handshake.

        pyOpenSSL 25+ lets ``Connection.set_session`` take only a session made
        through the very same ``Context`` object; OpenSSL asks only for a
        compatible one, which the client side's session keys guarantee.
        """
        if pylib.SSL_set_session(connection._ssl, _session_of(session)) != 1:
            drain_errors()
            raise SSL.Error([("SSL routines", "SSL_set_session", "session refused")])

    def session_reused(self, connection: SSL.Connection) -> bool:
        return bool(pylib.SSL_session_reused(connection._ssl))

    def session_identity(self, session: SSL.Session) -> int:
        """The address of the ``SSL_SESSION``: equal only for the same object."""
        return address(_session_of(session))

    def current_session_identity(self, connection: SSL.Connection) -> int:
        """The address of the connection's session, without taking a reference."""
        return address(pylib.SSL_get_session(connection._ssl))

    # -- shared runtime only ----------------------------------------------

    def set_cache_size(self, context: SSL.Context, size: int) -> None:
        lib = self._need("A session cache size limit")
        lib.SSL_CTX_ctrl(context._context, CTRL_SET_SESS_CACHE_SIZE, size, pyffi.NULL)

    def counters(self, context: SSL.Context) -> dict[str, int]:
        """OpenSSL's SSL_CTX_sess_* statistics for one context."""
        lib = self._need("OpenSSL's session statistics")
        pointer = context._context
        return {
            name: int(lib.SSL_CTX_ctrl(pointer, command, 0, pyffi.NULL))
            for name, command in COUNTERS.items()
        }

    def allows_tls13(self, context: SSL.Context) -> bool:
        """Whether the context may negotiate TLS 1.3 (then a hello's legacy session ID is noise)."""
        if self.context_options(context) & getattr(SSL, "OP_NO_TLSv1_3", 0):
            return False
        lib = self._need("Reading the protocol version bounds")
        highest = lib.SSL_CTX_ctrl(context._context, CTRL_GET_MAX_PROTO_VERSION, 0, pyffi.NULL)
        return highest == 0 or highest >= TLS1_3_VERSION

    def flush(self, context: SSL.Context, now: int) -> None:
        """SSL_CTX_flush_sessions(3): drop sessions expired at ``now``."""
        lib = self._need("Flushing expired sessions")
        lib.SSL_CTX_flush_sessions(context._context, now)

    def add_session(self, context: SSL.Context, session: SSL.Session) -> bool:
        lib = self._need("Adding a session to the cache")
        return bool(lib.SSL_CTX_add_session(context._context, _session_of(session)))

    def remove_session(self, context: SSL.Context, session: SSL.Session) -> bool:
        lib = self._need("Removing a session from the cache")
        return bool(lib.SSL_CTX_remove_session(context._context, _session_of(session)))

    def session_id(self, session: SSL.Session) -> bytes:
        lib = self._need("Reading a session ID")
        length = pyffi.new("unsigned int *")
        data = lib.SSL_SESSION_get_id(_session_of(session), length)
        return pyffi.buffer(data, length[0])[:]

    def session_protocol_version(self, session: SSL.Session) -> int:
        """The protocol version the session was made with (0x0304: TLS 1.3)."""
        lib = self._need("Reading a session's protocol version")
        return int(lib.SSL_SESSION_get_protocol_version(_session_of(session)))

    def session_expiry(self, session: SSL.Session) -> int:
        """When the session stops being resumable, in seconds since the epoch."""
        lib = self._need("Reading a session's lifetime")
        pointer = _session_of(session)
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
        server lookup for a session ID with a Session (``session_from_der``), or None.
        Callbacks must not raise; anything that escapes is logged and the
        handshake continues as if the callback had found nothing.
        """
        self._need("External session-cache callbacks")
        if self._session_callbacks is None:
            assert self._handles is not None
            self._session_callbacks = SessionCallbacks(self._handles, self._adopt, self._reference)
        self._session_callbacks.install(context, new, remove, get)

    def set_ticket_keys(self, context: SSL.Context, keys: ITicketKeySource) -> None:
        """SSL_CTX_set_tlsext_ticket_key_evp_cb(3): tickets sealed with keys this process shares.

        ``keys.current()`` names the key new tickets use (None: issue none);
        ``keys.find(name)`` returns ``(key, is_current)`` for a ticket's key
        name, or None, so tickets from any process holding the same keys
        resume here, and those under an older key are renewed.
        """
        self._need("Shared TLS ticket keys")
        if self._ticket_callback is None:
            assert self._handles is not None
            self._ticket_callback = TicketKeyCallback(self._handles)
        self._ticket_callback.install(context, keys)

    def _reference(self, session: SSL.Session) -> Any:
        """A new reference to the session's SSL_SESSION, for OpenSSL to own."""
        pointer = _session_of(session)
        self._lib.SSL_SESSION_up_ref(pointer)
        return pointer

    def _adopt(self, pointer: Any) -> SSL.Session:
        """A pyOpenSSL Session holding its own reference to an SSL_SESSION."""
        self._lib.SSL_SESSION_up_ref(pointer)
        return _session_holding(pyffi.gc(pyffi.cast("SSL_SESSION *", pointer), pylib.SSL_SESSION_free))


# SSL_OP_IGNORE_UNEXPECTED_EOF (openssl/ssl.h); pyOpenSSL has it, its type stubs do not.
OP_IGNORE_UNEXPECTED_EOF: int = getattr(SSL, "OP_IGNORE_UNEXPECTED_EOF", 0x80)


def _session_of(session: SSL.Session) -> Any:
    """pyOpenSSL's ``SSL_SESSION *`` of a Session (a private attribute, the only way to it)."""
    return session._session  # type: ignore[attr-defined]


def _session_holding(pointer: Any) -> SSL.Session:
    """A pyOpenSSL Session around an ``SSL_SESSION *`` whose reference it owns."""
    session = SSL.Session.__new__(SSL.Session)
    session._session = pointer  # type: ignore[attr-defined]
    return session


__all__: list[str] = [
    "BUNDLED",
    "COUNTERS",
    "SHARED",
    "GetSessionCallback",
    "NewSessionCallback",
    "OpenSSLAccess",
    "RemoveSessionCallback",
]

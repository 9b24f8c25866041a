"""The pyOpenSSL connection Twisted drives, with the hooks session caching needs.

Twisted's ``TLSMemoryBIOProtocol`` talks to an ``OpenSSL.SSL.Connection``
through a handful of calls (``bio_write``, ``do_handshake``, ``recv``,
``bio_shutdown``...). Standing between the two, a thin wrapper sees the
ClientHello before OpenSSL does, learns when a handshake ends and whether it
resumed, and keeps a session alive when the peer closes TCP without
``close_notify`` while still reporting that close to the application as
unclean. Everything else is passed through untouched.
"""

from __future__ import annotations

from typing import Any, Protocol

from OpenSSL import SSL
from twisted.internet.defer import Deferred

from twisted_sesscache.tls.clienthello import (
    MAX_HELLO_BYTES,
    ClientHello,
    ClientHelloError,
    ClientHelloReader,
    peek_session_id,
)
from twisted_sesscache._openssl import OpenSSLAccess, runtime as openssl_runtime

# What OpenSSL says when a peer closes without close_notify; Twisted turns an
# error with this reason into ConnectionLost (tls._representsEOF).
_UNEXPECTED_EOF = [("SSL routines", "", "unexpected eof while reading")]
# Bytes held while a hello's lookup runs: the hello, and as much again after it.
_MAX_HELD = 2 * MAX_HELLO_BYTES
# Errors that only mean "call again later".
_RETRY = (SSL.WantReadError, SSL.WantWriteError, SSL.WantX509LookupError)
# What Twisted calls on every connection and the wrapper passes through: bound
# once, up front, instead of through a failed lookup and __getattr__ each.
_PASSED_THROUGH = ("set_app_data", "set_accept_state", "bio_read", "shutdown")


class HandshakeObserver(Protocol):
    """Told about the handshakes of the connections it watches."""

    #: Whether ``after_read`` must see the reads after the handshake; if not, they go straight to OpenSSL.
    watches_reads: bool

    def client_hello(self, connection: WatchedConnection, hello: ClientHello) -> Deferred[None] | None:
        """A server connection's ClientHello, before OpenSSL sees it; a Deferred holds it back."""

    def holds_session(self, connection: WatchedConnection, session_id: bytes) -> bool:
        """Whether OpenSSL resumes ``session_id`` from its own cache: then the hello is not read."""

    def handshake_started(self, connection: WatchedConnection) -> Deferred[None] | None:
        """A Deferred holds the handshake back until it fires."""

    def handshake_done(self, connection: WatchedConnection) -> None: ...

    def after_read(self, connection: WatchedConnection) -> None:
        """A read after the handshake: TLS 1.3 tickets arrive this way."""


class WatchedConnection:
    """An ``SSL.Connection`` stand-in that reports its handshake to an observer."""

    def __init__(
        self,
        connection: SSL.Connection,
        observer: HandshakeObserver,
        *,
        keep_session_on_eof: bool = True,
        read_hello: bool = False,
        runtime: OpenSSLAccess | None = None,
    ) -> None:
        self.connection = connection
        self.handshake_complete = False
        self.truncated = False
        self.hello: ClientHello | None = None
        self._observer = observer
        self._keep_session_on_eof = keep_session_on_eof
        self._runtime = runtime or openssl_runtime()
        self._started = False
        self._waiting = False
        self._closed = False
        self._failed = False  # a fatal handshake error: Twisted is tearing the connection down
        # Server side: bytes held back until the ClientHello is read and what it
        # offers has been fetched; None once they flow straight to OpenSSL.
        self._held: bytearray | None = bytearray() if read_hello else None
        # Reads the hello as the held bytes arrive; None once it is read (or refused).
        self._reader: ClientHelloReader | None = ClientHelloReader() if read_hello else None
        passed = self.__dict__
        for name in _PASSED_THROUGH:
            passed[name] = getattr(connection, name)
        if not observer.watches_reads:
            # Nothing to see in the reads until a truncation (bio_shutdown): recv is OpenSSL's own.
            passed["recv"] = connection.recv

    def __getattr__(self, name: str) -> Any:
        # Bound methods are cached on the instance so that the calls Twisted
        # makes per record cost one attribute lookup, as on a plain Connection.
        value = getattr(self.connection, name)
        if callable(value):
            self.__dict__[name] = value
        return value

    def __repr__(self) -> str:
        return f"<WatchedConnection {self.connection!r}>"

    def bio_write(self, data: bytes) -> int:
        if self._held is None:
            return self.connection.bio_write(data) if data else 0
        self._held += data
        reader = self._reader
        if reader is None:
            # The hello was read and is held until its lookup is over. A client
            # that keeps sending meanwhile (nothing it should send before the
            # ServerHello comes near this) gets its bytes to OpenSSL at once.
            if len(self._held) > _MAX_HELD:
                self._release()
            return len(data)
        if not reader.started:
            # A session OpenSSL holds itself (TLS 1.2, a returning client) needs no lookup:
            # its ID sits at a fixed place, and the rest of the hello need not be read.
            session_id = peek_session_id(self._held)
            if session_id is not None and self._observer.holds_session(self, session_id):
                self._reader = None
                self._release()
                return len(data)
        try:
            hello = reader.feed(data)
        except ClientHelloError:
            self._reader = None
            self._release()  # OpenSSL rejects it with the proper alert
            return len(data)
        if hello is not None:
            # One hello, one lookup: whatever arrives from now on is only held.
            self._reader = None
            self.hello = hello
            waiting = self._observer.client_hello(self, hello)
            if waiting is None:
                self._release()
            else:
                waiting.addBoth(self._resume)
        return len(data)

    def _release(self) -> None:
        held, self._held = self._held, None
        if held and not self._closed:
            self.connection.bio_write(bytes(held))

    def _resume(self, _: object) -> None:
        """The lookup is over: hand OpenSSL the hello and let Twisted continue the handshake."""
        self._release()
        self._drive()

    def _start_handshake(self, _: object) -> None:
        self._waiting = False
        self._drive()

    def _drive(self) -> None:
        """Have Twisted call do_handshake again (an empty read does exactly that).

        Only while the TLS protocol still drives this connection: after a fatal
        TLS error Twisted drops the connection without ``bio_shutdown`` and
        then forgets it (``connectionLost`` sets ``_tlsConnection`` to None),
        so a lookup answering late must find nothing left to do.
        """
        if self.handshake_complete or self._closed or self._failed:
            return  # a lookup that answered after the handshake (the hello overflowed): nothing to drive
        tls_protocol = self.connection.get_app_data()
        if tls_protocol is None or not getattr(tls_protocol, "connected", False):
            return
        tls_protocol.dataReceived(b"")

    def _begin(self) -> None:
        """Tell the observer the handshake begins; raise WantReadError while it holds it back."""
        if not self._started:
            self._started = True
            waiting = self._observer.handshake_started(self)
            if waiting is not None:
                # The observer is fetching a session to offer: the ClientHello waits.
                self._waiting = True
                waiting.addBoth(self._start_handshake)
        if self._waiting:
            raise SSL.WantReadError()

    def do_handshake(self) -> None:
        if self._waiting or not self._started:
            self._begin()
        try:
            self.connection.do_handshake()
        except _RETRY:
            raise
        except SSL.Error:
            self._failed = True
            raise
        if not self.handshake_complete:
            self.handshake_complete = True
            self._observer.handshake_done(self)
            if self._held is None:
                # Nothing is held back any more: the records that follow go straight to OpenSSL.
                self.__dict__["bio_write"] = self.connection.bio_write
                self.__dict__["send"] = self.connection.send

    def send(self, buf: bytes, flags: int = 0) -> int:
        # Twisted writes what the application sends in connectionMade before it
        # calls do_handshake, and SSL_write would start the handshake itself.
        if not self.handshake_complete:
            self._begin()
        return self.connection.send(buf, flags)

    def recv(self, bufsiz: int, flags: int | None = None) -> bytes:
        """OpenSSL's recv, telling the observer of each read and a truncated close as one."""
        try:
            data: bytes = self.connection.recv(bufsiz, flags)
        except SSL.ZeroReturnError:
            if self.truncated:
                # Mark our side shut down too: SSL_free evicts the session of a
                # connection that never sent close_notify (ssl_clear_bad_session).
                self.connection.set_shutdown(self.connection.get_shutdown() | SSL.SENT_SHUTDOWN)
                raise SSL.Error(_UNEXPECTED_EOF) from None
            raise
        finally:
            if self.handshake_complete:
                self._observer.after_read(self)
        return data

    def bio_shutdown(self) -> None:
        """The TCP connection is gone: keep the session if the peer only skipped close_notify.

        OpenSSL 3 treats a missing close_notify as a fatal error, and a fatal
        error evicts the session. Since TLS 1.1 a truncated close need not
        invalidate the session (RFC 5246, 7.2.1), so for a connection whose
        handshake completed, OpenSSL is told to see the EOF as a close, and
        :meth:`recv` turns that close back into the error Twisted reports as
        ``ConnectionLost``.
        """
        self._closed = True
        if (
            self._keep_session_on_eof
            and self.handshake_complete
            and not self.connection.get_shutdown() & SSL.RECEIVED_SHUTDOWN
        ):
            self._runtime.ignore_unexpected_eof(self.connection)
            self.truncated = True
            self.__dict__.pop("recv", None)  # recv below turns the close back into the truncation
        self.connection.bio_shutdown()

    @property
    def resumed(self) -> bool:
        return self._runtime.session_reused(self.connection)

"""Connections to Redis that always come back, whatever went wrong.

txredisapi reconnects after a lost connection, but gives up for good
(``factory.stopTrying()``) when AUTH or SELECT gets an error or no reply while
a connection is being set up: after a stall longer than its reply timeout, a
wrong password, a listener that never answers. Here every connection logs in
with a deadline and is dropped (never given up on) when that fails; the
factory refuses to stop until the store closes; and a watchdog PINGs through
the pool, drops connections that no longer answer and rebuilds the pool if
anything stopped it anyway. It says once that the store went away and once
that it is back.
"""

from __future__ import annotations

import select
from collections import deque
from typing import Any

import txredisapi
from twisted.internet.defer import CancelledError, Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTCP, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from twisted_sesscache._twisted_compat import write_now
from twisted_sesscache.stores.redis_target import RedisTarget
from twisted_sesscache.stores.redis_wire import ReplyReader, encode_command


# Behind Sentinel, seconds between looks for the primary while there is none (a failover takes a few).
SENTINEL_RETRY = 0.5


class NotPrimary(txredisapi.ConnectionError):
    """Sentinel named a server that is (no longer) the primary."""


class _SetupProtocol(txredisapi.RedisProtocol):
    """Logs in, checks the role behind Sentinel and selects the database, all within a deadline.

    Requests and replies take the short way (``redis_wire``): each request's
    Deferred waits in a FIFO and its reply fires it directly; txredisapi's own
    commands (AUTH, SELECT, PING, ROLE) go the same way through ``execute_command``.
    """

    factory: Any
    _told = False  # why this connection never became usable has been told to the link

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._replies = ReplyReader()
        self._waiters: deque[Deferred[Any]] = deque()

    def send(self, command: bytes) -> Deferred[Any]:
        """Write one encoded request; the Deferred fires with its reply (an error reply fails it)."""
        waiter: Deferred[Any] = Deferred()
        self._waiters.append(waiter)
        write_now(self.transport, command)
        return waiter

    def execute_command(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        if not self.connected:
            raise txredisapi.ConnectionError("Not connected")
        return self.send(encode_command(*args))

    def dataReceived(self, data: bytes, *rest: Any) -> None:
        if self._ready:  # a logged-in connection: what a refused login says is no sign of life
            self.factory.link.last_reply = self.factory.link.clock.seconds()
        try:
            replies = self._replies.feed(data)
        except txredisapi.InvalidResponse as error:
            self.factory.link.connection_failed(error)
            self.transport.abortConnection()
            return
        for reply in replies:
            self.replyReceived(reply)

    def replyReceived(self, reply: Any) -> None:
        if not self._waiters:
            return  # a reply nobody asked for: nothing waits on it
        waiter = self._waiters.popleft()
        if waiter.called:
            return  # timed out or cancelled meanwhile
        if isinstance(reply, Exception):
            waiter.errback(reply)
        else:
            waiter.callback(reply)

    def connectionMade(self) -> None:
        setup = self._setup()
        setup.addTimeout(self.factory.link.setup_timeout, self.factory.link.clock)
        setup.addCallbacks(self._usable, self._unusable)

    @inlineCallbacks
    def _setup(self) -> Any:
        if self.password is not None:
            yield self.auth(self.password, self.username)
        if getattr(self.factory, "is_master", False):
            role = yield self.role()
            name = role[0].decode() if isinstance(role[0], bytes) else role[0]
            if name != "master":
                raise NotPrimary(f"Sentinel named a server whose role is {name}")
        if self.dbid:
            yield self.select(self.dbid)
        else:
            yield self.ping()  # a listener that never answers must never look usable

    def _usable(self, _: Any) -> None:
        self.connected = 1
        self._ready = True
        waiting: list[Deferred[Any]] = getattr(self, "_waiting_for_connect")  # txredisapi's, untyped
        setattr(self, "_waiting_for_connect", [])
        for deferred in waiting:
            deferred.callback(self)
        self.factory.link.connection_usable()

    def _unusable(self, failure: Any) -> None:
        if self._told:
            return  # connectionLost said why, better than txredisapi's "Lost connection"
        self._told = True
        self.factory.link.connection_failed(failure.value)
        self.transport.abortConnection()

    def connectionLost(self, why: Any) -> None:
        if not self._ready and not self._told:
            self._told = True
            self.factory.link.connection_failed(why.value)
        super().connectionLost(why)
        while self._waiters:
            self.replyReceived(txredisapi.ConnectionError("Lost connection"))


class _NeverStops:
    """Factory behaviour: quick, capped backoff; only the store's close() stops reconnecting."""

    initialDelay = 0.25
    factor = 2.0
    jitter = 0.1
    link: RedisLink

    def stopTrying(self) -> Deferred[Any]:
        if self.link.closing:
            return super().stopTrying()  # type: ignore[misc]
        return succeed(None)


class _DirectFactory(_NeverStops, txredisapi.RedisFactory):
    protocol = _SetupProtocol


class _SentinelFactory(_NeverStops, txredisapi.SentinelConnectionFactory):
    protocol = _SetupProtocol


class _SentinelEndpoint(txredisapi._SentinelEndpoint):
    """txredisapi's Sentinel endpoint, with TLS to the data nodes when the URL asks for it."""

    def _connect(self, addr: tuple[str, int], protocolFactory: Any) -> Deferred[Any]:
        host, port = addr
        return self.factory.link.endpoint(host, port).connect(protocolFactory)


@implementer(IStreamClientEndpoint)
class _RecordingEndpoint:
    """Tells the link why a connection attempt failed (refused, TLS, no primary), for its warning."""

    def __init__(self, inner: Any, link: RedisLink) -> None:
        self.inner = inner
        self.link = link

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        def failed(failure: Any) -> Any:
            self.link.connection_failed(failure.value)
            return failure

        return self.inner.connect(protocolFactory).addErrback(failed)


class RedisLink:
    """A txredisapi pool kept alive: ``connection()`` hands out a usable connection, or waits for one."""

    log = Logger()

    def __init__(
        self,
        target: RedisTarget,
        *,
        timeout: float = 1.0,
        poolsize: int = 2,
        interval: float = 0.5,
        max_delay: float = 2.0,
        reactor: Any,
    ) -> None:
        self.target = target
        self.clock = reactor
        self.poolsize = poolsize
        self.max_delay = max_delay
        self.probe_timeout = max(1.0, timeout)
        self.setup_timeout = max(2.0, timeout)
        self.dead_after = max(3.0, 2 * timeout)
        self.longest_budget = timeout  # the longest timeout a caller asked for: connections live that long
        self.last_reply = 0.0  # when bytes last came from Redis: it answers, however busy we are
        self.closing = False
        self.state = "starting"  # then "up" or "down"
        self.reconnects = 0
        self.connect_failures = 0
        self._usable_seen = 0
        self._down_since = 0.0
        self._last_error = f"no connection answered within {self.probe_timeout:g} s"
        self._probe: Deferred[Any] | None = None
        self._unanswered_since: float | None = None
        self._deciding = False
        self._built_at = 0.0
        self._tls: Any = self._tls_options() if target.tls else None
        self._sentinel: Any = None
        self._factory: Any = None
        self._interval = interval
        self._watchdog = LoopingCall(self._tick)

    def start(self) -> None:
        """Connect, on first use: not while options are parsed (before twistd forks), and on the clock
        the cache finally runs on."""
        if self._factory is not None or self.closing:
            return
        self._factory = self._build()
        self._watchdog.clock = self.clock
        self._watchdog.start(self._interval, now=False)

    @property
    def connected(self) -> bool:
        return self.state == "up" and bool(self._factory is not None and self._factory.size)

    @property
    def down(self) -> bool:
        return self.state == "down"

    def answering(self, since: float) -> bool:
        """Whether Redis has sent anything since ``since``, or has bytes waiting that we have not read yet."""
        if self.last_reply >= since:
            return True
        usable = [conn for conn in list(getattr(self._factory, "pool", ())) if getattr(conn, "_ready", False)]
        sockets = [fd for fd in map(_fileno, usable) if fd is not None]
        try:
            return bool(sockets) and bool(select.select(sockets, [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def ready(self) -> Any:
        """The first usable connection of the pool, at once; None when there is none right now.

        The same one while it lasts, the others standing by: the requests of a
        reactor turn then leave in one write and their replies come in one read.
        """
        factory = self._factory
        for conn in factory.pool if factory is not None else ():
            if conn.connected:
                return conn
        return None

    def connection(self) -> Deferred[Any]:
        """A usable connection (requests are pipelined on it), or a wait until one is."""
        self.start()
        return self._factory.getConnection(peek=True)

    def endpoint(self, host: str, port: int) -> Any:
        # The clock may be a stand-in with time only; connections need the reactor (as txredisapi's do).
        network = self.clock if IReactorTCP.providedBy(self.clock) else _global_reactor()
        endpoint: Any = HostnameEndpoint(network, host, port, timeout=self.setup_timeout)
        if self._tls is not None:
            endpoint = wrapClientTLS(self._tls(host), endpoint)
        return endpoint

    def connection_usable(self) -> None:
        self._usable_seen += 1
        if self._usable_seen > self.poolsize:
            self.reconnects += 1
        self._went_up()

    def connection_failed(self, error: BaseException) -> None:
        if isinstance(error, CancelledError) or self.closing:
            return
        self.connect_failures += 1
        self._last_error = _describe(error)
        if self.ready() is None:  # nothing left that answers: down now, not a probe timeout later
            self._went_down()

    def close(self) -> Deferred[Any]:
        self.closing = True
        if self._watchdog.running:
            self._watchdog.stop()
        if self._probe is not None:
            self._probe.cancel()
        if self._factory is None:
            return succeed(None)
        closing = [self._factory.disconnect()]
        if self._sentinel is not None:
            closing.append(self._sentinel.disconnect())
        return gatherResults(closing, consumeErrors=True)

    def _tls_options(self) -> Any:
        from twisted.internet.ssl import optionsForClientTLS

        from twisted_sesscache.trust import resolve_trust_root

        trust = resolve_trust_root(self.target.ca)
        return lambda host: optionsForClientTLS(self.target.sni or host, trustRoot=trust)

    def _build(self) -> Any:
        self._built_at = self.clock.seconds()
        target = self.target
        common = dict(dbid=target.db, poolsize=self.poolsize, isLazy=True, charset=None,
                      password=target.password, convertNumbers=False, username=target.username)
        factory: Any
        if target.sentinels:
            if self._sentinel is None:
                self._sentinel = txredisapi.Sentinel(list(target.sentinels))
                self._sentinel.discovery_timeout = SENTINEL_RETRY
                for node in self._sentinel.sentinels:
                    node._factory.maxDelay = self.max_delay
            factory = _SentinelFactory(sentinel_manager=self._sentinel, service_name=target.service,
                                       is_master=True, uuid=None, **common)
            endpoint: Any = _SentinelEndpoint(factory)
        else:
            factory = _DirectFactory(uuid=f"{target.host}:{target.port}", **common)
            endpoint = self.endpoint(target.host, target.port)
        factory.link = self
        # Behind Sentinel a refused connection usually means a failover under way: look again soon.
        factory.maxDelay = min(self.max_delay, SENTINEL_RETRY) if target.sentinels else self.max_delay
        factory.startConnecting(_RecordingEndpoint(endpoint, self))
        return factory

    def _tick(self) -> None:
        now = self.clock.seconds()
        if self._stopped() and now - self._built_at >= self.max_delay:
            self.log.info("Redis session store at {address}: rebuilding its connection pool",
                          address=self.target.address)
            self._factory.disconnect().addErrback(lambda _: None)
            self._factory = self._build()
        if self._probe is None:
            if self._unanswered_since is None:
                self._unanswered_since = now
            self._probe = self.connection().addCallback(lambda conn: conn.execute_command("PING"))
            self._probe.addCallbacks(self._answered, self._unanswered)
        if self._unanswered_since is not None and now - self._unanswered_since >= self.probe_timeout \
                and not self._deciding:
            # One more turn of the reactor first: a reply already in the socket counts.
            self._deciding = True
            self.clock.callLater(0, self._decide)

    def _stopped(self) -> bool:
        """Whether anything made the pool stop reconnecting (txredisapi's own paths)."""
        slots = getattr(self._factory, "slots", [])
        return bool(self._factory.stopped or any(not slot.reconnect for slot in slots))

    def _answered(self, _: Any) -> None:
        self._probe = None
        self._unanswered_since = None
        self._went_up()

    def _unanswered(self, failure: Any) -> None:
        self._probe = None
        if not failure.check(CancelledError):
            self._last_error = _describe(failure.value)

    def _decide(self) -> None:
        self._deciding = False
        if self._unanswered_since is None or self.closing:
            return
        if self.answering(self._unanswered_since):
            return  # Redis answers: this process was too busy to read the PING's reply yet
        silent = self.clock.seconds() - self._unanswered_since
        if self._factory.size:
            self._last_error = f"no answer to PING within {self.probe_timeout:g} s"
        self._went_down()
        if silent < max(self.dead_after, self.longest_budget):
            return  # a stall: the connections answer again when it ends, and calls sent may still be answered
        self._unanswered_since = self.clock.seconds()
        if self._probe is not None:
            self._probe.cancel()
        for conn in list(self._factory.pool):  # silent for too long (half-open): their slots reconnect
            conn.transport.abortConnection()

    def _went_down(self) -> None:
        if self.state == "down":
            return
        self.state = "down"
        self._down_since = self.clock.seconds()
        self.log.warn(
            "Redis session store at {address} is unavailable ({error}); handshakes go on without it "
            "while it reconnects",
            address=self.target.address,
            error=self._last_error,
        )

    def _went_up(self) -> None:
        if self.state == "up" or self.closing:
            return
        if self.state == "down":
            self.log.info(
                "Redis session store at {address} answers again after {seconds:.1f} s",
                address=self.target.address,
                seconds=self.clock.seconds() - self._down_since,
            )
        self.state = "up"


def _global_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:300]



def _fileno(protocol: Any) -> int | None:
    """The socket under a connection's transport (below TLS for rediss://), or None."""
    transport = getattr(protocol, "transport", None)
    for _ in range(3):
        fileno = getattr(transport, "fileno", None)
        if callable(fileno):
            try:
                return int(fileno())
            except (OSError, ValueError):
                return None
        transport = getattr(transport, "transport", None)
    return None

__all__ = ["NotPrimary", "RedisLink"]

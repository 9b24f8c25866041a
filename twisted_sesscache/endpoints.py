"""TLS with a session cache over any stream server endpoint, and the ``sesscache:`` string.

``sesscache:8443:certificate=c.pem:privateKey=k.pem:mode=server:timeout=300``
gives any twistd service that takes ``--listen`` (``twistd web``, ...) a TLS
listener whose sessions resume, with the same settings as ``twistd sesscache``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from twisted_sesscache.cache import SessionCache
from twisted_sesscache.settings import SETTINGS, cache_from_strings, certificate_from_strings, spelling, whole_number


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """Adds TLS, made by ``creator``, to the connections another endpoint accepts.

    With a ``cache``, listening also starts the cache's scheduled flush on
    ``clock``, and the flush stops when the last port this endpoint opened
    stops listening: the endpoint then carries the whole cache lifecycle, as a
    ``--listen`` string must when no service of ours is there to do it.
    """

    def __init__(
        self,
        wrapped: IStreamServerEndpoint,
        creator: IOpenSSLServerConnectionCreator,
        *,
        cache: SessionCache | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.wrapped = wrapped
        self.creator = creator
        self.cache = cache
        self.clock = clock
        self._ports = 0

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        listening: Deferred[Any] = self.wrapped.listen(TLSMemoryBIOFactory(self.creator, False, protocolFactory))
        if self.cache is None:
            return listening
        return listening.addCallback(self._started)

    def _started(self, port: IListeningPort) -> IListeningPort:
        assert self.cache is not None
        self._ports += 1
        self.cache.start(self.clock)
        return _CacheStoppingPort(port, self._stopped)

    def _stopped(self) -> None:
        self._ports -= 1
        if self._ports == 0 and self.cache is not None:
            self.cache.stop()


@implementer(IListeningPort)
class _CacheStoppingPort:
    """A listening port that tells its endpoint once when it stops listening."""

    def __init__(self, port: IListeningPort, stopped: Callable[[], None]) -> None:
        self._port = port
        self._on_stop: Callable[[], None] | None = stopped

    def startListening(self) -> None:
        self._port.startListening()

    def stopListening(self) -> Deferred[None]:
        result: Deferred[None] = maybeDeferred(self._port.stopListening)
        if self._on_stop is not None:
            stopped, self._on_stop = self._on_stop, None
            stopped()
        return result

    loseConnection = stopListening

    def getHost(self) -> Any:
        return self._port.getHost()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._port, name)

    def __repr__(self) -> str:
        return f"<TLS session-cache port on {self._port!r}>"


# -- the endpoint string --------------------------------------------------------

PARAMETERS = (
    "port",
    "interface",
    "backlog",
    "certificate",
    "privateKey",
    "mode",
    "timeout",
    "flushInterval",
    "size",
    "sessionIdContext",
    "tickets",
    "keepSessionsOnTruncation",
    "store",
    "storeKeyFile",
    "storeTimeout",
    "ticketKeyRotation",
)
SPELLING = spelling(
    {
        "flush_interval": "flushInterval",
        "session_id_context": "sessionIdContext",
        "keep_sessions_on_truncation": "keepSessionsOnTruncation",
        "store_key_file": "storeKeyFile",
        "store_timeout": "storeTimeout",
        "ticket_key_rotation": "ticketKeyRotation",
        "private_key": "privateKey",
    }
)


def sesscache_endpoint(reactor: Any, *args: str, **kwargs: str) -> TLSServerEndpoint:
    """Build the endpoint a ``sesscache:`` string describes.

    Raises ValueError whose message names the bad parameter; nothing listens yet.
    """
    try:
        return _build(reactor, args, kwargs)
    except ValueError as error:
        raise ValueError(f"sesscache endpoint: {error}") from None


def _build(reactor: Any, args: tuple[str, ...], kwargs: dict[str, str]) -> TLSServerEndpoint:
    if len(args) > 1:
        raise ValueError(f"one positional value (the port) expected, not {list(args)}")
    if args:
        if "port" in kwargs:
            raise ValueError("port is given twice")
        kwargs = {**kwargs, "port": args[0]}
    unknown = sorted(set(kwargs) - set(PARAMETERS))
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r}; known: {', '.join(PARAMETERS)}")
    if "port" not in kwargs:
        raise ValueError("port is required, as in sesscache:8443:certificate=cert.pem")
    if "certificate" not in kwargs:
        raise ValueError("certificate=PEM is required")

    port = whole_number(kwargs["port"], "port")
    backlog = whole_number(kwargs.get("backlog", "50"), "backlog", minimum=1)
    cache = cache_from_strings({setting: kwargs.get(SPELLING(setting)) for setting in SETTINGS}, SPELLING)
    options = certificate_from_strings(
        kwargs["certificate"], kwargs.get("privateKey"), SPELLING, enableSessionTickets=cache.tickets
    )
    tcp = TCP4ServerEndpoint(reactor, port, backlog=backlog, interface=kwargs.get("interface", ""))
    return TLSServerEndpoint(tcp, cache.server_context_factory(options), cache=cache, clock=reactor)


@implementer(IPlugin, IStreamServerEndpointStringParser)
class SessionCacheServerParser:
    """The ``sesscache:`` prefix for ``serverFromString`` and every ``--listen`` option."""

    prefix = "sesscache"

    def parseStreamServer(self, reactor: Any, *args: str, **kwargs: str) -> TLSServerEndpoint:
        return sesscache_endpoint(reactor, *args, **kwargs)


__all__ = ["PARAMETERS", "SessionCacheServerParser", "TLSServerEndpoint", "sesscache_endpoint"]

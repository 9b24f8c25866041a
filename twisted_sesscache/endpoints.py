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
    IReactorCore,
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from twisted_sesscache.cache import SessionCache
from twisted_sesscache.config import SETTINGS, CacheConfig, parameter_spelling, parse_as, whole_number
from twisted_sesscache.exceptions import ConfigurationError
from twisted_sesscache.handshakes import HANDSHAKE_TIMEOUT, HandshakeFailures, HandshakeGuardFactory
from twisted_sesscache.server.alpn import parse_alpn
from twisted_sesscache.server.certificates import server_certificate, server_certificates


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """Adds TLS, made by ``creator``, to the connections another endpoint accepts.

    With a ``cache``, listening also starts the cache's scheduled flush, and
    the flush stops when the last port this endpoint opened stops listening:
    the endpoint then carries the whole cache lifecycle, as a ``--listen``
    string must when no service of ours is there to do it. With
    ``handshakes``, every protocol is guarded: handshakes not completed after
    ``handshake_timeout`` are dropped, and failures are counted (in the
    cache's statistics) and logged, whatever factory listens.
    """

    def __init__(
        self,
        wrapped: IStreamServerEndpoint,
        creator: IOpenSSLServerConnectionCreator,
        *,
        cache: SessionCache | None = None,
        handshakes: HandshakeFailures | None = None,
        handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.wrapped = wrapped
        self.creator = creator
        self.cache = cache
        self.handshakes = handshakes
        self.handshake_timeout = handshake_timeout
        if cache is not None and handshakes is not None:
            cache.report(lambda: handshakes.counts)
        self._ports = 0

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        if self.handshakes is not None:
            protocolFactory = HandshakeGuardFactory(
                protocolFactory, self.handshakes, timeout=self.handshake_timeout, clock=self.handshakes.clock
            )
        listening: Deferred[Any] = self.wrapped.listen(TLSMemoryBIOFactory(self.creator, False, protocolFactory))
        if self.cache is None:
            return listening
        return listening.addCallback(self._started)

    def _started(self, port: IListeningPort) -> IListeningPort:
        assert self.cache is not None
        self._ports += 1
        self.cache.start()
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

    def stopListening(self) -> Deferred[Any]:
        stop: Callable[[], object] = self._port.stopListening
        result: Deferred[Any] = maybeDeferred(stop)
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

LISTENER_PARAMETERS = (
    "port", "interface", "backlog", "certificate", "privateKey", "certificates", "privateKeyPassphraseFile", "alpn",
)
PARAMETERS = LISTENER_PARAMETERS + tuple(setting.parameter for setting in SETTINGS)


def sesscache_endpoint(reactor: Any, *args: str, **kwargs: str) -> TLSServerEndpoint:
    """Build the endpoint a ``sesscache:`` string describes.

    Raises ValueError whose message names the bad parameter; nothing listens yet.
    """
    try:
        return _build(reactor, args, kwargs)
    except ConfigurationError as error:
        raise ConfigurationError(None, f"sesscache endpoint: {error.spelled(parameter_spelling)}") from None


def _build(reactor: Any, args: tuple[str, ...], kwargs: dict[str, str]) -> TLSServerEndpoint:
    if len(args) > 1:
        raise ConfigurationError(None, f"one positional value (the port) expected, not {list(args)}")
    if args:
        if "port" in kwargs:
            raise ConfigurationError("port", "given twice")
        kwargs = {**kwargs, "port": args[0]}
    unknown = sorted(set(kwargs) - set(PARAMETERS))
    if unknown:
        raise ConfigurationError(None, f"unknown parameter {unknown[0]!r}; known: {', '.join(PARAMETERS)}")
    if "port" not in kwargs:
        raise ConfigurationError("port", "required, as in sesscache:8443:certificate=cert.pem")
    if ("certificate" in kwargs) == ("certificates" in kwargs):
        raise ConfigurationError(
            "certificate", "required, once: certificate=PEM, or certificates=DIR for several chosen by SNI"
        )
    if "certificates" in kwargs and "privateKey" in kwargs:
        raise ConfigurationError("private_key", "goes with certificate=; with certificates=DIR each file holds its key")

    port = parse_as("port", whole_number, kwargs["port"])
    backlog = parse_as("backlog", lambda text: whole_number(text, minimum=1), kwargs.get("backlog", "50"))
    config = CacheConfig.from_strings({setting.name: kwargs.get(setting.parameter) for setting in SETTINGS})
    alpn = parse_alpn(kwargs.get("alpn", ""), setting="alpn")
    passphrase_file = kwargs.get("privateKeyPassphraseFile")
    options: Any
    if "certificates" in kwargs:
        options = server_certificates(
            [kwargs["certificates"]], tickets=bool(config.tickets), passphrase_file=passphrase_file,
            setting="certificates",
        )
    else:
        options = server_certificate(
            kwargs["certificate"], kwargs.get("privateKey"), tickets=bool(config.tickets),
            passphrase_file=passphrase_file,
        )
    cache = SessionCache(config=config, clock=reactor)
    tcp = TCP4ServerEndpoint(reactor, port, backlog=backlog, interface=kwargs.get("interface", ""))
    creator = cache.server_context_factory(options, alpn)
    return TLSServerEndpoint(tcp, creator, cache=cache, handshakes=HandshakeFailures(reactor))


@implementer(IPlugin, IStreamServerEndpointStringParser)
class SessionCacheServerParser:
    """The ``sesscache:`` prefix for ``serverFromString`` and every ``--listen`` option."""

    prefix = "sesscache"

    def parseStreamServer(self, reactor: IReactorCore, *args: object, **kwargs: object) -> IStreamServerEndpoint:
        return sesscache_endpoint(reactor, *(str(a) for a in args), **{k: str(v) for k, v in kwargs.items()})


__all__ = ["PARAMETERS", "SessionCacheServerParser", "TLSServerEndpoint", "sesscache_endpoint"]

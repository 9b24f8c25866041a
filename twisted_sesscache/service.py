"""The services ``twistd sesscache`` runs: the cache's lifecycle and the listeners' start-up lines."""

from __future__ import annotations

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from twisted_sesscache import __version__
from twisted_sesscache._openssl import runtime as openssl_runtime
from twisted_sesscache._twisted_compat import raise_synchronously
from twisted_sesscache.cache import SessionCache


def version_text() -> str:
    from importlib.metadata import version

    return (f"twisted-sesscache {__version__} (Twisted {version('twisted')}, pyOpenSSL {version('pyopenssl')})\n"
            f"runtime: {openssl_runtime().describe()}")


class SessionCacheService(service.Service):
    """Says which runtime is active, once, and runs the cache's flush loop with the service."""

    log = Logger()

    def __init__(self, cache: SessionCache, notes: list[str] | None = None) -> None:
        self.cache = cache
        self.notes = notes or []
        self._announced = False

    def privilegedStartService(self) -> None:
        # Before the listeners (later siblings) bind, so the runtime line comes first.
        super().privilegedStartService()
        self._announce()

    def startService(self) -> None:
        super().startService()
        self._announce()
        self.cache.start()

    def _announce(self) -> None:
        if self._announced:
            return
        self._announced = True
        self.log.info(
            "twisted-sesscache {version}, {runtime}", version=__version__, runtime=openssl_runtime().describe()
        )
        for note in self.notes:
            self.log.info("{note}", note=note)

    def stopService(self) -> Deferred[None] | None:
        self.cache.stop()
        return super().stopService()


@implementer(IStreamServerEndpoint)
class AnnouncedEndpoint:
    """Logs where the TLS listener listens, and how to watch resumption there."""

    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, upstream: str | None) -> None:
        self.endpoint = endpoint
        self.upstream = upstream

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.endpoint.listen(protocolFactory).addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        address = port.getHost()
        host, number = getattr(address, "host", None), getattr(address, "port", None)
        if host is None or number is None:
            self.log.info("TLS listener on {address}", address=address)
            return port
        shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)
        if self.upstream:
            self.log.info("TLS listener on {host}:{port}, proxying to {upstream}",
                          host=host, port=number, upstream=self.upstream)
        else:
            from twisted_sesscache.status import watch_commands

            first, second = watch_commands(shown, number)
            self.log.info(
                "Status page: https://{shown}:{port}/ (each reload is a new connection). Watch resumption "
                "with two openssl runs, the second says Reused:\n  {first}\n  {second}",
                shown=shown, port=number, first=first, second=second,
            )
        return port


def listener(endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> StreamServerEndpointService:
    """A listening service that stops start-up when it cannot listen (as ``strports.service`` does)."""
    return raise_synchronously(StreamServerEndpointService(endpoint, factory))


__all__ = ["AnnouncedEndpoint", "SessionCacheService", "listener", "version_text"]

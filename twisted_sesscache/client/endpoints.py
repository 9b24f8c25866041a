"""``sesscache-tls:`` client endpoints: Twisted's ``tls:`` with session resumption.

    sesscache-tls:example.com:443
    sesscache-tls:example.com:443:trustRoots=/etc/my-ca:certificate=client.pem:privateKey=client.key
    sesscache-tls:backend.internal:8443:endpoint=tcp\\:10.0.0.7\\:8443:alpn=h2,http/1.1

Arguments are those of ``tls:`` (``timeout``, ``bindAddress``, ``certificate``,
``privateKey``, ``trustRoots``, ``endpoint``) plus ``alpn``; ``trustRoots``
may also name a single PEM file. Every endpoint parsed in a process shares one
client session cache (:func:`default_cache`), so sessions outlive the endpoint
objects that learned them; an application that owns a ``SessionCache`` hands it
over with :func:`set_default_cache` so its statistics include these clients.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.endpoints import HostnameEndpoint, clientFromString, wrapClientTLS
from twisted.internet.interfaces import IReactorCore, IStreamClientEndpoint, IStreamClientEndpointStringParserWithReactor
from twisted.plugin import IPlugin
from zope.interface import implementer

from twisted_sesscache.cache import SessionCache
from twisted_sesscache.trust import load_client_certificate
from twisted_sesscache.modes import CacheMode

_default: SessionCache | None = None


def default_cache() -> SessionCache:
    """The process-wide cache behind ``sesscache-tls:`` endpoints (made on first use)."""
    global _default
    if _default is None:
        _default = SessionCache(CacheMode.CLIENT)
    return _default


def set_default_cache(cache: SessionCache | None) -> None:
    """Use ``cache`` for ``sesscache-tls:`` endpoints parsed from now on (None: a fresh one on next use)."""
    global _default
    _default = cache


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class SessionTLSClientParser:
    """``IStreamClientEndpointStringParserWithReactor`` for the ``sesscache-tls`` prefix."""

    prefix = "sesscache-tls"

    def __init__(self, cache: SessionCache | None = None) -> None:
        self._cache = cache

    @property
    def cache(self) -> SessionCache:
        return self._cache if self._cache is not None else default_cache()

    def parseStreamClient(self, reactor: IReactorCore, *args: object, **kwargs: object) -> IStreamClientEndpoint:
        """``reactor`` is the one ``clientFromString`` was given; the arguments are the description's strings."""
        return self._parse(reactor, *cast("tuple[str, ...]", args), **cast("dict[str, str]", kwargs))

    def _parse(
        self,
        reactor: IReactorCore,
        host: bytes | str,
        port: bytes | str,
        timeout: bytes | str = "30",
        bindAddress: bytes | str | None = None,
        certificate: bytes | str | None = None,
        privateKey: bytes | str | None = None,
        trustRoots: bytes | str | None = None,
        endpoint: bytes | str | None = None,
        alpn: bytes | str | None = None,
        **unknown: object,
    ) -> IStreamClientEndpoint:
        if unknown:
            raise TypeError("unrecognized keyword arguments present", sorted(unknown))
        hostname, port_number = _text(host), int(port)
        creator = self.cache.client_creator(
            hostname,
            trust_root=_text(trustRoots) if trustRoots is not None else None,
            client_certificate=(
                load_client_certificate(_text(certificate), _text(privateKey) if privateKey else None)
                if certificate is not None
                else None
            ),
            alpn=[p.encode("ascii") for p in _text(alpn).split(",") if p] if alpn else (),
            port=port_number,
        )
        if endpoint is not None:
            wrapped = clientFromString(reactor, _text(endpoint))
        else:
            wrapped = HostnameEndpoint(
                reactor,
                hostname,
                port_number,
                int(timeout),
                None if bindAddress is None else (_text(bindAddress), 0),
            )
        return wrapClientTLS(creator, wrapped)


parser = SessionTLSClientParser()
"""The instance ``twisted/plugins`` registers; it uses :func:`default_cache`."""

__all__ = ["SessionTLSClientParser", "default_cache", "parser", "set_default_cache"]

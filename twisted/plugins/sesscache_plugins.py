"""twisted-sesscache's plugins: ``twistd sesscache``, the ``sesscache:`` and ``sesscache-tls:`` endpoint strings.

Twisted imports every plugin module whenever it looks for plugins (any
``serverFromString`` call, ``twistd --help``), so this module stays light:
OpenSSL and the rest of the package are imported only when a plugin is used.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import ServiceMaker
from twisted.internet.interfaces import (
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from zope.interface import implementer

sesscache = ServiceMaker(
    "twisted-sesscache",
    "twisted_sesscache.tap",
    "A TLS-terminating proxy (or status page) with OpenSSL's session cache, so that clients resume.",
    "sesscache",
)


@implementer(IPlugin, IStreamServerEndpointStringParser)
class _SessionCacheEndpointParser:
    """``sesscache:PORT:certificate=...``; see twisted_sesscache.endpoints."""

    prefix = "sesscache"

    def parseStreamServer(self, reactor: Any, *args: object, **kwargs: object) -> Any:
        from twisted_sesscache.endpoints import SessionCacheServerParser

        return SessionCacheServerParser().parseStreamServer(reactor, *args, **kwargs)


sesscacheEndpoint = _SessionCacheEndpointParser()


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class _SessionTLSClientParser:
    """``sesscache-tls:HOST:PORT:...``, Twisted's ``tls:`` with resumption; see twisted_sesscache.client.endpoints."""

    prefix = "sesscache-tls"

    def parseStreamClient(self, reactor: Any, *args: Any, **kwargs: Any) -> Any:
        from twisted_sesscache.client.endpoints import parser

        return parser.parseStreamClient(reactor, *args, **kwargs)


sesscacheTLSClientEndpoint = _SessionTLSClientParser()

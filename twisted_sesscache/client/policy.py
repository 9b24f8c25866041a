"""An ``IPolicyForHTTPS`` for ``Agent`` and treq whose connections resume sessions."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

from twisted.internet.ssl import PrivateCertificate
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from twisted_sesscache.client.creator import SessionClientCreator
from twisted_sesscache.client.key import TrustRoot

DEFAULT_CREATORS = 128


class CreatorSource(Protocol):
    """What the policy needs from the cache: ``ClientSessionCache.creator``."""

    def creator(
        self,
        hostname: str,
        *,
        trust_root: TrustRoot = None,
        client_certificate: PrivateCertificate | None = None,
        alpn: Sequence[bytes] = (),
        port: int | None = None,
        extra_options: dict[str, Any] | None = None,
        send_server_name: bool | None = None,
    ) -> SessionClientCreator: ...


@implementer(IPolicyForHTTPS)
class SessionHTTPSPolicy:
    """Like ``BrowserLikePolicyForHTTPS``, with resumption and one creator (one context) per netloc.

    Building a context per request, as Twisted's policy does, would cost a
    context (and its CA store) each time; the ``creators`` most recently used
    netlocs keep theirs.
    """

    def __init__(
        self,
        cache: CreatorSource,
        *,
        trust_root: TrustRoot = None,
        client_certificate: PrivateCertificate | None = None,
        alpn: Sequence[bytes] = (),
        extra_options: dict[str, Any] | None = None,
        creators: int = DEFAULT_CREATORS,
    ) -> None:
        self.cache = cache
        self._trust_root = trust_root
        self._client_certificate = client_certificate
        self._alpn = tuple(alpn)
        self._extra_options = extra_options
        self._limit = creators
        self._creators: OrderedDict[tuple[str, int], SessionClientCreator] = OrderedDict()

    def creatorForNetloc(self, hostname: bytes | str, port: int) -> SessionClientCreator:
        host = hostname.decode("ascii") if isinstance(hostname, bytes) else hostname
        creator = self._creators.get((host, port))
        if creator is None:
            creator = self.cache.creator(
                host,
                port=port,
                trust_root=self._trust_root,
                client_certificate=self._client_certificate,
                alpn=self._alpn,
                extra_options=self._extra_options,
            )
            self._creators[(host, port)] = creator
            if len(self._creators) > self._limit:
                self._creators.popitem(last=False)
        else:
            self._creators.move_to_end((host, port))
        return creator


__all__ = ["DEFAULT_CREATORS", "CreatorSource", "SessionHTTPSPolicy"]

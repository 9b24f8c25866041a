"""ALPN on the server side that never aborts a handshake for want of overlap.

Twisted 26.10 gives every ``CertificateOptions`` context an ALPN select
callback (``twisted.internet._sslverify.setupForALPN``) that returns ``b""``
when the client's offer and the protocols on offer here do not overlap.
pyOpenSSL reads only ``SSL.NO_OVERLAPPING_PROTOCOLS`` as "no ALPN", hands
OpenSSL a zero-length choice, and OpenSSL fails the handshake with an
``internal_error`` alert: curl, browsers and ``openssl s_client -alpn`` are
refused by any listener whose factory declares no protocols.

:func:`install_alpn` replaces that callback on a context with one that picks
the server's first preference among the client's offer and otherwise answers
``NO_OVERLAPPING_PROTOCOLS``, so the handshake goes on without ALPN, as nginx
and OpenSSL's own servers do (RFC 7301 lets a server ignore the extension).
Twisted installs its callback once, when the context is made, so replacing it
on the context after that is enough: every connection made from the context,
and every connection switched to it by SNI, uses ours.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IProtocolNegotiationFactory

from twisted_sesscache import _twisted_compat as compat
from twisted_sesscache.exceptions import ConfigurationError

ProtocolsFor = Callable[[SSL.Connection], Sequence[bytes]]

# RFC 7301 section 3.1: a name is 1 to 255 bytes, the list at most 2^16-1 bytes
# (each name preceded by its one-byte length).
MAX_NAME = 255
MAX_LIST = 2**16 - 1

_installed: weakref.WeakKeyDictionary[SSL.Context, ProtocolsFor] = weakref.WeakKeyDictionary()


def parse_alpn(value: str | Iterable[str | bytes], setting: str = "alpn") -> tuple[bytes, ...]:
    """``"h2,http/1.1"`` -> ``(b"h2", b"http/1.1")``, in order of preference, duplicates dropped.

    Raises ConfigurationError naming ``setting`` for an empty name, a name over
    255 bytes, a name that is not printable ASCII, or a list too long for the
    ALPN extension. An empty string is the empty list (no ALPN of our own).
    """
    items: Iterable[str | bytes]
    if isinstance(value, str):
        items = value.split(",") if value.strip() else ()
    else:
        items = value
    names: list[bytes] = []
    for item in items:
        name = _one_name(item, setting)
        if name not in names:
            names.append(name)
    if sum(1 + len(name) for name in names) > MAX_LIST:
        raise ConfigurationError(setting, f"the protocol list is longer than ALPN's {MAX_LIST} bytes")
    return tuple(names)


def _one_name(item: str | bytes, setting: str) -> bytes:
    text = item.decode("ascii", "replace") if isinstance(item, bytes) else item
    text = text.strip()
    if not text:
        raise ConfigurationError(setting, "empty protocol name in the list (write e.g. h2,http/1.1)")
    if not (text.isascii() and text.isprintable()) or "\ufffd" in text:
        raise ConfigurationError(setting, f"protocol name {text!r} is not printable ASCII")
    name = text.encode("ascii")
    if len(name) > MAX_NAME:
        raise ConfigurationError(setting, f"protocol name {text[:20]!r}... is longer than {MAX_NAME} bytes")
    return name


def choose(offered: Sequence[bytes], preference: Sequence[bytes]) -> bytes | None:
    """The first of ``preference`` that the client offered, or None."""
    offer = set(offered)
    for protocol in preference:
        if protocol in offer:
            return protocol
    return None


def factory_protocols(connection: SSL.Connection) -> tuple[bytes, ...]:
    """What the factory behind a Twisted TLS connection declares (IProtocolNegotiationFactory)."""
    tls_protocol = connection.get_app_data()
    factory = getattr(tls_protocol, "factory", None)
    wrapped = getattr(factory, "wrappedFactory", None)
    negotiation = IProtocolNegotiationFactory(wrapped, None)
    if negotiation is None:
        return ()
    return tuple(negotiation.acceptableProtocols())


def protocols_for(configured: Sequence[bytes] = (), options: Any = None) -> ProtocolsFor:
    """The server's preference for one connection: the factory's protocols, then the configured ones.

    ``options`` may offer protocols of its own: a ``CertificateOptions``'
    ``acceptableProtocols`` still count, as they did under Twisted's
    callback, and so do an ``SNICertificates``'; the order is Twisted's own.
    """
    static = tuple(dict.fromkeys((*configured, *options_protocols(options))))

    def preference(connection: SSL.Connection) -> tuple[bytes, ...]:
        return tuple(dict.fromkeys((*factory_protocols(connection), *static)))

    return preference


def options_protocols(options: Any) -> tuple[bytes, ...]:
    """What the wrapped options offer: a public ``acceptable_protocols``, else CertificateOptions' own."""
    own = getattr(options, "acceptable_protocols", None)
    return tuple(own) if own is not None else compat.acceptable_protocols(options)


def install_alpn(context: SSL.Context, protocols: ProtocolsFor) -> None:
    """Give ``context`` the ALPN select callback that continues without ALPN on no overlap.

    Installing again on the same context replaces the preference function
    but installs no second callback.
    """
    if context in _installed:
        _installed[context] = protocols
        return
    _installed[context] = protocols
    # The callback must not keep the context alive through itself.
    context_ref = weakref.ref(context)

    def select(connection: SSL.Connection, offered: list[bytes]) -> Any:
        current = context_ref()
        preference = _installed.get(current) if current is not None else None
        chosen = choose(offered, preference(connection)) if preference is not None else None
        return SSL.NO_OVERLAPPING_PROTOCOLS if chosen is None else chosen

    context.set_alpn_select_callback(select)


def installed(context: SSL.Context) -> bool:
    """Whether :func:`install_alpn` has run on ``context``."""
    return context in _installed


__all__ = ["choose", "factory_protocols", "install_alpn", "installed", "parse_alpn", "protocols_for"]

"""The PROXY protocol header (HAProxy's ``send-proxy``, v1 text and v2 binary), sent to a backend first.

A backend behind a TLS terminator sees the terminator's address as its peer;
the PROXY header tells it the client's. It must be the first bytes on the TCP
connection, below TLS when the upstream leg speaks TLS, so the header goes
in through an endpoint wrapper that writes it when TCP connects, before the
protocol above (TLS or the relay) writes anything.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IProtocolFactory, IStreamClientEndpoint
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer

from twisted_sesscache.proxy_config import PROXY_PROTOCOL_VERSIONS as VERSIONS

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY, _V2_LOCAL = 0x21, 0x20  # version 2, command PROXY or LOCAL
_V2_TCP4, _V2_TCP6, _V2_UNSPEC = 0x11, 0x21, 0x00


def _ip(address: IAddress) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(address, (IPv4Address, IPv6Address)) or address.type != "TCP":
        return None
    return ipaddress.ip_address(address.host.split("%", 1)[0])


def _addresses(source: IAddress, destination: IAddress) -> tuple[Any, Any, int, int] | None:
    """Both ends as ip_address objects of one family, with their ports; None when not TCP over IP."""
    src, dst = _ip(source), _ip(destination)
    if src is None or dst is None:
        return None
    if src.version != dst.version:  # an IPv4 peer on a dual-stack socket: both as IPv6
        src, dst = (ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a for a in (src, dst))
    return src, dst, source.port, destination.port  # type: ignore[attr-defined]


def header_v1(source: IAddress, destination: IAddress) -> bytes:
    """``PROXY TCP4 src dst sport dport\\r\\n`` (or TCP6); ``PROXY UNKNOWN\\r\\n`` for other transports."""
    ends = _addresses(source, destination)
    if ends is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst, sport, dport = ends
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def header_v2(source: IAddress, destination: IAddress) -> bytes:
    """The binary v2 header: PROXY over TCP4 or TCP6; LOCAL (no address) for other transports."""
    ends = _addresses(source, destination)
    if ends is None:
        return V2_SIGNATURE + struct.pack("!BBH", _V2_LOCAL, _V2_UNSPEC, 0)
    src, dst, sport, dport = ends
    body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    family = _V2_TCP4 if src.version == 4 else _V2_TCP6
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, family, len(body)) + body


def header(version: str, source: IAddress, destination: IAddress) -> bytes:
    """The header of ``version`` ("v1" or "v2") for a client at ``source`` that reached us at ``destination``."""
    if version == "v1":
        return header_v1(source, destination)
    if version == "v2":
        return header_v2(source, destination)
    raise ValueError(f"PROXY protocol version must be one of {', '.join(VERSIONS)}, not {version!r}")


class _HeaderFirst(ProtocolWrapper):
    def makeConnection(self, transport: Any) -> None:
        transport.write(self.factory.header)
        super().makeConnection(transport)


class _HeaderFirstFactory(WrappingFactory):
    protocol = _HeaderFirst
    noisy = False

    def __init__(self, wrappedFactory: IProtocolFactory, header: bytes) -> None:
        super().__init__(wrappedFactory)
        self.header = header


@implementer(IStreamClientEndpoint)
class HeaderFirstEndpoint:
    """A client endpoint whose connections carry ``header`` before anything the protocol writes."""

    def __init__(self, wrapped: IStreamClientEndpoint, header: bytes) -> None:
        self.wrapped = wrapped
        self.header = header

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        connecting: Deferred[Any] = self.wrapped.connect(_HeaderFirstFactory(protocolFactory, self.header))
        return connecting.addCallback(lambda wrapper: wrapper.wrappedProtocol)


__all__ = ["VERSIONS", "HeaderFirstEndpoint", "header", "header_v1", "header_v2"]

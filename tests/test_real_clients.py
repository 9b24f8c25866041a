"""Real clients against real twistd listeners: curl, headless Chromium, Python ssl, openssl s_client.

Three paths, each a ``twistd`` subprocess under the runtime being tested:

* ``status``: ``twistd sesscache --generate-certificate``, its status page and ``/stats.json``;
* ``web``: ``twistd web --listen sesscache:...``, a page that says whether its connection resumed;
* ``forward``: ``twistd portforward -p sesscache:...`` to a plain HTTP backend. Its factory
  declares no ALPN protocol, which made every ALPN-offering client fail (design.md, fact 10).

Every client offers ALPN. Whether a connection resumed is read on the client's
side (curl: no server Certificate message; Chromium: its NetLog; Python:
``session_reused``; s_client: "Reused") and, where the path can tell, on the
server's too. Each test prints a ``MEASURED`` line with its figures.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, cast

import pytest
from twisted.internet.interfaces import ISystemHandle
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tests.browser import CHROMIUM, chromium
from tests.support import PEER_TIMEOUT, ReactorThread, TLSFiles, free_port, reactor, s_client
from tests.test_alpn import alpn_handshake
from tests.test_endpoints import description
from tests.test_tap import twistd
from twisted_sesscache.certs import certificate_options

CURL = "curl"
TLS_VERSIONS = ["1.2", "1.3"]
PATHS = ["status", "web", "forward", "proxy", "proxy-tls"]
NAVIGATIONS = 4
CURL_FLAGS = {"1.2": ("--tlsv1.2", "--tls-max", "1.2"), "1.3": ("--tlsv1.3",)}


class ConnectionPage(Resource):
    """``twistd web --class`` root: says whether the visitor's TLS connection resumed, then closes it."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        handle = cast(ISystemHandle, request.channel.transport).getHandle()
        resumed = bool(getattr(handle, "resumed", False))
        request.channel.persistent = False
        request.setHeader(b"connection", b"close")
        request.setHeader(b"content-type", b"text/plain")
        return f"connection resumed: {'yes' if resumed else 'no'}\n".encode()


class BackendPage(Resource):
    """The plain-HTTP backend behind portforward: one answer, then the connection closes."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.channel.persistent = False
        request.setHeader(b"connection", b"close")
        request.setHeader(b"content-type", b"text/plain")
        return b"hello from the backend\n"


@dataclass(frozen=True)
class Listener:
    """One path under test: where it listens, and what its pages say about resumption."""

    name: str
    port: int
    resumed_marker: bytes | None  # text a page shows when its own connection resumed
    hits: Callable[[], int] | None  # the server's resumption count, where it can tell

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/"


def stats_hits(stats_port: int) -> Callable[[], int]:
    def hits() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{stats_port}/stats.json", timeout=10) as answer:
            return int(json.loads(answer.read())["hits"])

    return hits


@pytest.fixture(scope="module")
def listeners(
    reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Listener]]:
    """The three twistd processes (and the backend), started once for the module, stopped after it."""
    workdir = tmp_path_factory.mktemp("real-clients")
    status_port, stats_port, web_port, forward_port = (free_port() for _ in range(4))
    proxy_port, proxy_stats, proxy_tls_port, proxy_tls_stats = (free_port() for _ in range(4))
    backend = reactor_thread.call(reactor.listenTCP, 0, Site(BackendPage()), interface="127.0.0.1")
    backend_port = backend.getHost().port
    tls_backend = reactor_thread.call(
        reactor.listenSSL, 0, Site(BackendPage()),
        certificate_options(tls_files.certificate, tls_files.private_key), interface="127.0.0.1",
    )
    tls_backend_port = tls_backend.getHost().port
    try:
        with twistd(
            workdir, "sesscache", "--listen", f"tcp:{status_port}:interface=127.0.0.1", "--generate-certificate",
            "--stats", f"tcp:{stats_port}:interface=127.0.0.1",
        ) as status, twistd(
            workdir, "web", "--listen", description(tls_files, web_port), "--class",
            f"{__name__}.ConnectionPage",
        ) as web, twistd(
            workdir, "portforward", "-p", description(tls_files, forward_port), "-h", "127.0.0.1",
            "-d", str(backend_port),
        ) as forward, twistd(
            workdir, "sesscache", "--listen", f"tcp:{proxy_port}:interface=127.0.0.1", "--generate-certificate",
            "--stats", f"tcp:{proxy_stats}:interface=127.0.0.1", "--upstream", f"tcp:127.0.0.1:{backend_port}",
        ) as proxy, twistd(
            workdir, "sesscache", "--listen", f"tcp:{proxy_tls_port}:interface=127.0.0.1", "--generate-certificate",
            "--stats", f"tcp:{proxy_tls_stats}:interface=127.0.0.1",
            "--upstream", f"tcp:127.0.0.1:{tls_backend_port}", "--upstream-tls", "--upstream-hostname", "localhost",
            "--upstream-ca", str(tls_files.certificate), "--session-cache-mode", "both",
        ) as proxy_tls:
            status.wait_for(status_port, stats_port)
            web.wait_for(web_port)
            forward.wait_for(forward_port)
            proxy.wait_for(proxy_port, proxy_stats)
            proxy_tls.wait_for(proxy_tls_port, proxy_tls_stats)
            yield {
                "status": Listener("status", status_port, b"Resumed: this connection", stats_hits(stats_port)),
                "web": Listener("web", web_port, b"connection resumed: yes", None),
                "forward": Listener("forward", forward_port, None, None),
                "proxy": Listener("proxy", proxy_port, None, stats_hits(proxy_stats)),
                "proxy-tls": Listener("proxy-tls", proxy_tls_port, None, stats_hits(proxy_tls_stats)),
            }
    finally:
        reactor_thread.call(backend.stopListening)
        reactor_thread.call(tls_backend.stopListening)


def measured(**figures: Any) -> None:
    print("MEASURED", json.dumps(figures, sort_keys=True))


# -- curl -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", TLS_VERSIONS)
@pytest.mark.parametrize("path", PATHS)
def test_curl_second_url_resumes(listeners: dict[str, Listener], path: str, tls: str) -> None:
    """Two URLs in one curl run, default ALPN offer (h2,http/1.1): two connections, the second resumes."""
    listener = listeners[path]
    hits_before = listener.hits() if listener.hits else None
    done = subprocess.run(
        [CURL, "-sSkv", *CURL_FLAGS[tls], "--max-time", "10", listener.url, listener.url],
        capture_output=True, timeout=PEER_TIMEOUT + 10, check=False,
    )
    log = done.stderr.decode(errors="replace")
    assert done.returncode == 0, log[-2000:]
    assert log.count("ALPN: offers h2,http/1.1") == 2, log[-2000:]  # two connections, both offering ALPN
    full = len(re.findall(rf"TLSv{tls} \(IN\), TLS handshake, Certificate \(11\)", log))
    figures: dict[str, Any] = {"client": "curl", "path": path, "tls": tls, "pages": 2, "full_handshakes": full}
    if listener.resumed_marker is not None:
        figures["pages_saying_resumed"] = done.stdout.count(listener.resumed_marker)
    if listener.hits is not None:
        figures["server_hits"] = listener.hits() - hits_before  # type: ignore[operator]
    measured(**figures)
    assert full == 1, log[-2000:]
    assert figures.get("pages_saying_resumed", 1) == 1 and figures.get("server_hits", 1) == 1, figures


# -- headless Chromium ------------------------------------------------------------------------------


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: run scripts/install-system-deps.sh")
@pytest.mark.parametrize("path", PATHS)
def test_chromium_later_navigation_resumes(listeners: dict[str, Listener], path: str) -> None:
    """In one browser process, navigations on new connections: the page loads, and later ones resume."""
    listener = listeners[path]
    with chromium() as browser:
        responses, texts = [], []
        for _ in range(NAVIGATIONS):
            responses.append(browser.navigate(listener.url))
            texts.append(browser.text())
        handshakes = browser.resumed_handshakes()
    assert all(r.status == 200 and r.protocol in ("TLS 1.2", "TLS 1.3") for r in responses), responses
    assert len({r.connection_id for r in responses}) == NAVIGATIONS, responses  # each on its own connection
    figures: dict[str, Any] = {
        "client": "chromium", "path": path, "pages": len(responses), "protocol": responses[0].protocol,
        "cipher": responses[0].cipher, "alpn": responses[0].alpn,
        "handshakes": len(handshakes), "resumed_handshakes": sum(handshakes),
    }
    if listener.resumed_marker is not None:
        marker = listener.resumed_marker.decode()
        figures["pages_saying_resumed"] = sum(marker in text for text in texts)
    measured(**figures)
    assert handshakes and not handshakes[0] and any(handshakes[1:]), handshakes
    if listener.resumed_marker is not None:
        assert marker not in texts[0] and figures["pages_saying_resumed"] >= 1, texts


# -- Python ssl ----------------------------------------------------------------------------------------


def python_get(
    port: int, context: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[bool | None, ssl.SSLSession | None, bytes]:
    """One request over a new connection offering ``session``: (resumed, the session to offer next, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):  # reading to the end brings the TLS 1.3 tickets in
                answer += chunk
            return tls.session_reused, tls.session, answer


@pytest.mark.parametrize("tls", TLS_VERSIONS)
@pytest.mark.parametrize("path", PATHS)
def test_python_ssl_reuses_its_session(listeners: dict[str, Listener], path: str, tls: str) -> None:
    listener = listeners[path]
    version = ssl.TLSVersion.TLSv1_2 if tls == "1.2" else ssl.TLSVersion.TLSv1_3
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = version
    context.set_alpn_protocols(["h2", "http/1.1"])
    results, session = [], None
    for _ in range(3):
        resumed, session, body = python_get(listener.port, context, session)
        assert b" 200 " in body.split(b"\r\n", 1)[0], body[:200]
        results.append(resumed)
    measured(client="python-ssl", path=path, tls=tls, pages=len(results), resumed=sum(results))
    assert results == [False, True, True]


# -- openssl s_client -alpn -----------------------------------------------------------------------------


@pytest.mark.parametrize("offer", ["h2,http/1.1", "foo"])
@pytest.mark.parametrize("path", PATHS)
def test_s_client_alpn_offers_complete(listeners: dict[str, Listener], path: str, offer: str, tmp_path: Path) -> None:
    """Any ALPN offer completes a handshake (no internal_error), and the session still resumes."""
    port = listeners[path].port
    for tls in TLS_VERSIONS:
        completed, chosen = alpn_handshake(port, offer, tls)
        assert completed, (path, offer, tls)
        # Site declares http/1.1; the status page and twistd web serve through Site. The proxy
        # and portforward declare nothing (the proxy's --alpn is not given here).
        assert chosen == ("http/1.1" if path in ("status", "web") and "http/1.1" in offer else None)
        session = tmp_path / f"session-{tls}.pem"
        extra = ("-alpn", offer)
        first = s_client(port, tls=tls, sess_out=session, extra=extra)
        again = s_client(port, tls=tls, sess_in=session, extra=extra)
        measured(client="s_client", path=path, tls=tls, alpn=offer, chosen=chosen, results=[first, again])
        assert (first, again) == ("New", "Reused")

"""Client-side resumption against openssl s_server and Twisted servers, in both runtimes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from OpenSSL import SSL
# The shared runtime's service-identity (Debian's 18.1.0) ships no py.typed.
from service_identity import VerificationError  # type: ignore[import-untyped]
from twisted.internet import endpoints, protocol
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, clientFromString, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.ssl import Certificate, TLSVersion, optionsForClientTLS, trustRootFromCertificates
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, PartialDownloadError, readBody

from tests.support import InfoProtocol, ReactorThread, TLSFiles, free_port, reactor, s_server
from twisted_sesscache.client import endpoints as client_endpoints
from twisted_sesscache.cache import SessionCache
from twisted_sesscache.certs import certificate_options, generate_self_signed
from twisted_sesscache.client.cache import ClientSessionCache
from twisted_sesscache.client.sessions import ClientSessions, Entry
from twisted_sesscache.tls.session_der import session_facts
from twisted_sesscache.trust import load_client_certificate, load_trust_root
from twisted_sesscache import RUNTIME

REQUEST = b"GET / HTTP/1.0\r\n\r\n"
VERSIONS = ["1.2", "1.3"]
SERIES = 20


# -- a Twisted client ------------------------------------------------------------


class Fetch(protocol.Protocol):
    """Sends one request, collects the answer until the connection closes."""

    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[Fetch] = Deferred()
        self.handle: Any = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.handle = cast(TLSMemoryBIOProtocol, self.transport).getHandle()
        self.transport.write(REQUEST)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if reason.check(ConnectionDone) or (reason.check(ConnectionLost) and self.data):
            self.done.callback(self)
        else:
            self.done.errback(reason)

    @property
    def resumed(self) -> bool:
        return RUNTIME.session_reused(getattr(self.handle, "connection", self.handle))

    @property
    def server_says_resumed(self) -> bool:
        """What the server reports: s_server's page, or InfoProtocol's JSON."""
        if b"Reused, " in self.data:
            return True
        if b"New, " in self.data:
            return False
        return bool(json.loads(self.data.split(b"\r\n\r\n", 1)[1])["resumed"])


def fetch(creator: Any, port: int) -> Deferred[Fetch]:
    client = Fetch()
    d = connectProtocol(wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)), client)
    d.addCallback(lambda _: client.done)
    d.addTimeout(15, reactor)
    return d


def series(rt: ReactorThread, creator: Any, port: int, count: int = SERIES) -> list[bool]:
    """``count`` sequential connections; whether each resumed (client and server must agree)."""
    results = []
    for _ in range(count):
        done = rt.call(fetch, creator, port)
        assert done.resumed == done.server_says_resumed, done.data[-300:]
        results.append(done.resumed)
    return results


def spy_offers(client: ClientSessionCache) -> list[bytes | None]:
    """Record what each connection was offered (the DER of the session, or None)."""
    offered: list[bytes | None] = []
    take = client.take

    def recording(key: Any) -> bytes | None:
        der = take(key)
        offered.append(der)
        return der

    client.take = recording  # type: ignore[method-assign]
    return offered


# -- servers -----------------------------------------------------------------------


def version_options(tls: str) -> dict[str, Any]:
    if tls == "1.2":
        return {"lowerMaximumSecurityTo": TLSVersion.TLSv1_2}
    return {"raiseMinimumTo": TLSVersion.TLSv1_3}


def server_creator(files: TLSFiles, tls: str, alpn: list[bytes] | None = None, **cache_options: Any) -> Any:
    options = certificate_options(
        files.certificate, files.private_key, acceptableProtocols=alpn, **version_options(tls)
    )
    return SessionCache("server", **cache_options).server_context_factory(options)


@contextmanager
def twisted_server(
    rt: ReactorThread, creator: Any, port: int = 0, factory: protocol.Factory | None = None
) -> Iterator[int]:
    factory = factory or protocol.Factory.forProtocol(InfoProtocol)
    listening = rt.call(reactor.listenSSL, port, factory, creator, interface="127.0.0.1")
    try:
        yield listening.getHost().port
    finally:
        rt.call(listening.stopListening)


def trusting(files: TLSFiles) -> Certificate:
    return Certificate.loadPEM(files.certificate.read_bytes())


@pytest.fixture(scope="module")
def named_tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A certificate for alpha.test and beta.test (both served from 127.0.0.1)."""
    cert, key = generate_self_signed(tmp_path_factory.mktemp("named"), "alpha.test", "ecdsa", ("beta.test",))
    return TLSFiles(cert, key)


# -- resumption against outside and Twisted peers ---------------------------------------


@pytest.mark.parametrize("tls", VERSIONS)
def test_openssl_server_resumes(reactor_thread: ReactorThread, tls_files: TLSFiles, tls: str) -> None:
    cache = SessionCache("client")
    creator = cache.client_creator("localhost", trust_root=trusting(tls_files))
    offered = spy_offers(cache.client)
    with s_server(tls_files, tls, "-num_tickets", "2") as port:
        resumed = series(reactor_thread, creator, port, 1)
        if tls == "1.3":
            # Shared runtime: the new-session callback sees both tickets. Bundled:
            # the session pointer changes once per read that brought tickets.
            assert cache.client.stats()["number"] == 2 if RUNTIME.shared else cache.client.stats()["number"] >= 1
        resumed += series(reactor_thread, creator, port, SERIES - 1)
    stats = cache.stats()["client"]
    print(f"openssl s_server TLS {tls}: {sum(resumed)}/{len(resumed)} resumed, client stats {stats}")
    assert sum(resumed) >= SERIES - 1
    assert not resumed[0]
    assert stats["connect"] == stats["connect_good"] == SERIES
    assert stats["hits"] == sum(resumed) and stats["misses"] == 0
    if tls == "1.3":  # every ticket offered at most once (RFC 8446, C.4), at most per_key kept
        tickets = [der for der in offered if der is not None]
        assert len(tickets) == len(set(tickets)) == SERIES - 1
        assert stats["number"] <= cache.client.sessions.per_key
    else:  # one TLS 1.2 session, offered again and again
        assert len({der for der in offered if der is not None}) == 1
        assert stats["number"] == 1


@pytest.mark.parametrize("tls", VERSIONS)
def test_twisted_server_resumes(reactor_thread: ReactorThread, tls_files: TLSFiles, tls: str) -> None:
    cache = SessionCache("client")
    creator = cache.client_creator("localhost", trust_root=trusting(tls_files))
    offered = spy_offers(cache.client)
    with twisted_server(reactor_thread, server_creator(tls_files, tls)) as port:
        resumed = series(reactor_thread, creator, port)
    stats = cache.client.stats()
    print(f"Twisted server TLS {tls}: {sum(resumed)}/{len(resumed)} resumed, client stats {stats}")
    assert sum(resumed) >= SERIES - 1
    assert stats["hits"] == sum(resumed) and stats["misses"] == 0
    if tls == "1.3":
        tickets = [der for der in offered if der is not None]
        assert len(tickets) == len(set(tickets))


def test_parallel_connections_take_distinct_tickets(reactor_thread: ReactorThread, tls_files: TLSFiles) -> None:
    cache = SessionCache("client")
    creator = cache.client_creator("localhost", trust_root=trusting(tls_files))
    with s_server(tls_files, "1.3", "-num_tickets", "2") as port:
        series(reactor_thread, creator, port, 1)
        available = len(cache.client.sessions)  # 2 in the shared runtime, 1 or 2 in the bundled one
        offered = spy_offers(cache.client)
        results = reactor_thread.call(lambda: gatherResults([fetch(creator, port) for _ in range(3)]))
    tickets = [der for der in offered if der is not None]
    assert len(tickets) == len(set(tickets)) == available  # one ticket each; the rest got none
    assert sum(r.resumed for r in results) == available


def test_lifetime_capped_and_flushed(reactor_thread: ReactorThread, tls_files: TLSFiles) -> None:
    cache = SessionCache("client", timeout=5)
    creator = cache.client_creator("localhost", trust_root=trusting(tls_files))
    offered = spy_offers(cache.client)
    with s_server(tls_files, "1.2") as port:  # s_server's sessions live 7200 s; ours 5 s
        series(reactor_thread, creator, port, 1)
        (entry,) = next(iter(cache.client.sessions._keys.values()))
        assert entry.expires <= time.time() + 5
        assert cache.client.flush(time.time() + 1) == 0
        assert cache.client.flush(time.time() + 6) == 1
        assert series(reactor_thread, creator, port, 1) == [False]
    assert offered == [None, None]
    assert cache.stats()["client"]["expired"] == 1


class Opaque:
    """A client creator wrap() cannot look into: no getContext(), no optionsForClientTLS internals."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        return self._inner.clientConnectionForTLS(tlsProtocol)


def test_opaque_creator(reactor_thread: ReactorThread, tls_files: TLSFiles) -> None:
    from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
    from zope.interface import directlyProvides

    cache = SessionCache("client")
    opaque = Opaque(optionsForClientTLS("localhost", trustRoot=trusting(tls_files)))
    directlyProvides(opaque, IOpenSSLClientConnectionCreator)
    provider = cast(IOpenSSLClientConnectionCreator, opaque)  # directlyProvides: mypy cannot see it
    with pytest.raises(ValueError, match="hostname="):
        cache.client.wrap(provider)
    with pytest.raises(ValueError, match="trust_root="):
        cache.client.wrap(provider, hostname="localhost")
    creator = cache.client.wrap(provider, hostname="localhost", trust_root=trusting(tls_files))
    with twisted_server(reactor_thread, server_creator(tls_files, "1.2")) as port:
        resumed = series(reactor_thread, creator, port, 3)
    # Its context is first seen with a connection already made from it: that
    # connection keeps Twisted's random session-ID context, so it is left alone.
    # pyOpenSSL 25+ (the bundled runtime here) then refuses to change the context.
    expected = [False, False, True] if RUNTIME.shared else [False, False, False]
    assert resumed == expected


def test_creators_for_one_key_share_sessions(reactor_thread: ReactorThread, tls_files: TLSFiles) -> None:
    """Two creators (two contexts) with the same settings: a session learned by one serves the other."""
    cache = SessionCache("client")
    first = cache.client_creator("localhost", trust_root=trusting(tls_files))
    second = cache.client_creator("localhost", trust_root=trusting(tls_files))
    with twisted_server(reactor_thread, server_creator(tls_files, "1.3")) as port:
        assert series(reactor_thread, first, port, 1) == [False]
        assert series(reactor_thread, second, port, 3) == [True, True, True]


# -- isolation ----------------------------------------------------------------------------


@pytest.mark.parametrize("tls", VERSIONS)
def test_never_offered_to_another_server_name(reactor_thread: ReactorThread, named_tls: TLSFiles, tls: str) -> None:
    cache = SessionCache("client")
    alpha = cache.client_creator("alpha.test", trust_root=trusting(named_tls))
    beta = cache.client_creator("beta.test", trust_root=trusting(named_tls))
    offered = spy_offers(cache.client)
    with twisted_server(reactor_thread, server_creator(named_tls, tls)) as port:
        assert series(reactor_thread, alpha, port, 2) == [False, True]
        alpha_offers = [der for der in offered if der is not None]
        del offered[:]
        assert series(reactor_thread, beta, port, 1) == [False]
        assert offered == [None]
        assert series(reactor_thread, beta, port, 1) == [True]
        assert offered[-1] not in alpha_offers
        assert series(reactor_thread, alpha, port, 1) == [True]
    assert cache.client.stats()["misses"] == 0


def test_never_offered_under_other_trust_roots_or_client_certificate(
    reactor_thread: ReactorThread, tls_files: TLSFiles, other_tls_files: TLSFiles
) -> None:
    cache = SessionCache("client")
    client = cache.client
    base = client.creator("localhost", trust_root=trusting(tls_files))
    wider = client.creator(
        "localhost", trust_root=trustRootFromCertificates([trusting(tls_files), trusting(other_tls_files)])
    )
    from_file = client.creator("localhost", trust_root=str(tls_files.certificate))
    with_certificate = client.creator(
        "localhost",
        trust_root=trusting(tls_files),
        client_certificate=load_client_certificate(other_tls_files.certificate, other_tls_files.private_key),
    )
    with_alpn = client.creator("localhost", trust_root=trusting(tls_files), alpn=[b"http/1.1"])
    offered = spy_offers(client)
    # A Twisted server without ALPN fails clients that offer it, cache or not.
    with twisted_server(reactor_thread, server_creator(tls_files, "1.2", alpn=[b"http/1.1"])) as port:
        assert series(reactor_thread, base, port, 2) == [False, True]
        for other in (wider, with_certificate, with_alpn):
            del offered[:]
            assert series(reactor_thread, other, port, 1) == [False], other
            assert offered == [None]
        # The same CA given as a file has the same fingerprint: the same key.
        assert series(reactor_thread, from_file, port, 1) == [True]
        assert series(reactor_thread, with_certificate, port, 1) == [True]
    assert client.stats()["misses"] == 0


# -- faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", VERSIONS)
def test_server_restart_is_one_miss(reactor_thread: ReactorThread, tls_files: TLSFiles, tls: str) -> None:
    cache = SessionCache("client")
    creator = cache.client_creator("localhost", trust_root=trusting(tls_files))
    with twisted_server(reactor_thread, server_creator(tls_files, tls)) as port:
        assert series(reactor_thread, creator, port, 2) == [False, True]
    # The same address, a new server with a fresh cache: it forgot every session.
    with twisted_server(reactor_thread, server_creator(tls_files, tls), port):
        assert series(reactor_thread, creator, port, 3) == [False, True, True]
    stats = cache.client.stats()
    assert (stats["hits"], stats["misses"], stats["connect_good"]) == (3, 1, 5)


def test_verification_failure_with_or_without_cached_session(
    reactor_thread: ReactorThread, tls_files: TLSFiles, other_tls_files: TLSFiles
) -> None:
    cache = SessionCache("client")
    client = cache.client
    good = client.creator("localhost", trust_root=trusting(tls_files))
    wrong_root = client.creator("localhost", trust_root=trusting(other_tls_files))
    wrong_name = client.creator("wrong.test", trust_root=trusting(tls_files))
    offered = spy_offers(client)
    port = free_port()
    with twisted_server(reactor_thread, server_creator(tls_files, "1.2"), port):
        with pytest.raises(SSL.Error):  # nothing cached yet
            reactor_thread.call(fetch, wrong_root, port)
        assert series(reactor_thread, good, port, 2) == [False, True]
        with pytest.raises(SSL.Error):  # a session is cached, for another trust root
            reactor_thread.call(fetch, wrong_root, port)
        with pytest.raises(VerificationError):
            reactor_thread.call(fetch, wrong_name, port)
    assert offered[-2:] == [None, None]
    # Same address, a server this client must not trust: the cached session is
    # offered, not resumed, and the full handshake fails verification.
    with twisted_server(reactor_thread, server_creator(other_tls_files, "1.2"), port), pytest.raises(SSL.Error):
        reactor_thread.call(fetch, good, port)
    assert offered[-1] is not None
    stats = client.stats()
    assert stats["connect"] - stats["connect_good"] == 4


class Truncating(protocol.Protocol):
    """Answers, then closes TCP under TLS without close_notify."""

    def dataReceived(self, data: bytes) -> None:
        tls = cast(TLSMemoryBIOProtocol, self.transport)
        tls.write(b"HTTP/1.0 200 OK\r\n\r\n" + json.dumps({"resumed": tls.getHandle().resumed}).encode())
        assert tls.transport is not None
        tls.transport.loseConnection()


@pytest.mark.parametrize("keep", [True, False], ids=["keep", "strict"])
def test_truncated_close(reactor_thread: ReactorThread, tls_files: TLSFiles, keep: bool) -> None:
    """A server that skips close_notify: sessions kept by default, dropped in strict mode (design.md, fact 7)."""
    cache = SessionCache("client", keep_sessions_on_truncation=keep)
    creator = cache.client_creator("localhost", trust_root=trusting(tls_files))
    # Stateless tickets, so the server side's own view of the truncation does not matter.
    options = certificate_options(
        tls_files.certificate, tls_files.private_key, enableSessionTickets=True, **version_options("1.2")
    )
    server = SessionCache("server", tickets=True).server_context_factory(options)
    with twisted_server(reactor_thread, server, factory=protocol.Factory.forProtocol(Truncating)) as port:
        resumed = series(reactor_thread, creator, port, 5)
    if keep:
        assert resumed == [False, True, True, True, True]
    else:
        assert resumed == [False] * 5
        stats = cache.client.stats()
        assert (stats["invalidated"], stats["number"], stats["offered"]) == (5, 0, 0)


# -- the ways Twisted users connect ------------------------------------------------------------


def test_connect_ssl(reactor_thread: ReactorThread, tls_files: TLSFiles) -> None:
    cache = SessionCache("client")
    creator = cache.client_creator("localhost", trust_root=trusting(tls_files))

    def once(port: int) -> Deferred[Fetch]:
        client = Fetch()
        reactor.connectSSL("127.0.0.1", port, protocol.ClientFactory.forProtocol(lambda: client), creator)
        return client.done.addTimeout(15, reactor)

    with twisted_server(reactor_thread, server_creator(tls_files, "1.3")) as port:
        results = [reactor_thread.call(once, port) for _ in range(4)]
    assert [r.server_says_resumed for r in results] == [False, True, True, True]


def test_wrap_existing_creator(reactor_thread: ReactorThread, tls_files: TLSFiles) -> None:
    cache = SessionCache("client")
    plain = optionsForClientTLS("localhost", trustRoot=trusting(tls_files))
    creator = cache.client.wrap(plain)
    assert cache.client.wrap(creator) is creator
    with pytest.raises(ValueError, match="not the name"):
        cache.client.wrap(plain, hostname="other.test")
    with twisted_server(reactor_thread, server_creator(tls_files, "1.2")) as port:
        assert series(reactor_thread, creator, port, 3) == [False, True, True]


def test_agent_through_https_policy(reactor_thread: ReactorThread, tls_files: TLSFiles) -> None:
    cache = SessionCache("client")
    agent = Agent(reactor, contextFactory=cache.https_policy(trust_root=trusting(tls_files)))

    def get(port: int) -> Deferred[bytes]:
        d = agent.request(b"GET", f"https://localhost:{port}/".encode()).addCallback(readBody)
        # No Content-Length: the body ends with the connection, which Twisted flags.
        d.addErrback(lambda failure: failure.trap(PartialDownloadError) and failure.value.response)
        return d.addTimeout(15, reactor)

    with twisted_server(reactor_thread, server_creator(tls_files, "1.3")) as port:
        answers = [json.loads(reactor_thread.call(get, port)) for _ in range(5)]
    assert [a["resumed"] for a in answers] == [False, True, True, True, True]
    assert cache.stats()["client"]["hits"] == 4


def test_endpoint_string(reactor_thread: ReactorThread, tls_files: TLSFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    """``clientFromString`` with ``sesscache-tls:`` (HostnameEndpoint underneath) against s_server."""
    registered = endpoints.getPlugins

    def plugins(interface: Any, package: Any = None) -> Any:
        yield client_endpoints.parser
        yield from registered(interface, package)

    monkeypatch.setattr(endpoints, "getPlugins", plugins)
    cache = SessionCache("client")
    monkeypatch.setattr(client_endpoints, "_default", cache)

    def once(description: str) -> Deferred[Fetch]:
        client = Fetch()
        d = connectProtocol(clientFromString(reactor, description), client)
        return d.addCallback(lambda _: client.done).addTimeout(15, reactor)

    with s_server(tls_files, "1.3") as port:
        description = f"sesscache-tls:localhost:{port}:trustRoots={tls_files.certificate}:timeout=5"
        results = [reactor_thread.call(once, description) for _ in range(5)]
    assert [r.server_says_resumed for r in results] == [False, True, True, True, True]
    assert cache.stats()["client"]["hits"] == 4
    with pytest.raises(TypeError):
        clientFromString(reactor, "sesscache-tls:localhost:443:bogus=1")


def test_endpoint_plugin_registered() -> None:
    from twisted.internet.interfaces import IStreamClientEndpointStringParserWithReactor
    from twisted.plugin import getPlugins

    prefixes = {p.prefix for p in getPlugins(IStreamClientEndpointStringParserWithReactor)}
    assert "sesscache-tls" in prefixes


# -- the store and the session facts -------------------------------------------------------------


def test_store_bounds() -> None:
    store = ClientSessions(size=3, per_key=2)
    store.put("a", Entry(b"a13-1", True, 100))
    store.put("a", Entry(b"a13-2", True, 100))
    store.put("a", Entry(b"a13-3", True, 100))  # per key: the newest two
    assert len(store) == 2
    newest = store.take("a", 0)
    assert newest is not None and newest.der == b"a13-3"  # newest first, and gone
    store.put("b", Entry(b"b12-1", False, 100))
    store.put("b", Entry(b"b12-2", False, 100))  # replaces b12-1
    assert len(store) == 2
    first, again = store.take("b", 0), store.take("b", 0)
    assert first is not None and again is not None
    assert first.der == again.der == b"b12-2"  # TLS 1.2 stays
    store.put("c", Entry(b"c12", False, 50))
    store.put("d", Entry(b"d12", False, 100))  # size 3: the least recently used key ("a") loses
    assert store.take("a", 0) is None and store.evicted == 1
    assert store.take("c", 60) is None and store.expired == 1  # expired at take
    store.put("e", Entry(b"e12", False, 10))
    assert store.flush(20) == 1 and len(store) == 2


def test_client_stats_under_parent(tls_files: TLSFiles) -> None:
    cache = SessionCache("both")
    assert "client" not in cache.stats()
    cache.client_creator("localhost", trust_root=trusting(tls_files))
    stats = cache.stats()["client"]
    assert {"connect", "connect_good", "hits", "misses", "number"} <= set(stats)
    assert cache.client.timeout == cache.timeout


@pytest.mark.shared_only("SSL_SESSION_get_time/get_timeout/get_id, to compare with, are not in PyPI wheels' binding")
def test_session_facts_agree_with_openssl(reactor_thread: ReactorThread, tls_files: TLSFiles) -> None:
    cache = SessionCache("client")
    creator = cache.client_creator("localhost", trust_root=trusting(tls_files))
    with twisted_server(reactor_thread, server_creator(tls_files, "1.2")) as port:
        done = reactor_thread.call(fetch, creator, port)
    session = done.handle.get_session()
    facts = session_facts(RUNTIME.session_to_der(session))
    assert facts is not None
    assert facts.expiry == RUNTIME.session_expiry(session)
    assert facts.resumable == bool(RUNTIME.session_id(session))
    assert facts.version == 0x0303


def test_bad_files_name_themselves(tmp_path: Path) -> None:
    from twisted_sesscache.certs import CertificateError

    with pytest.raises(CertificateError, match="missing.pem"):
        load_trust_root(tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(CertificateError, match="junk.pem"):
        load_client_certificate(tmp_path / "junk.pem")

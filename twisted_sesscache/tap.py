"""``twistd sesscache``: a TLS listener whose sessions resume, in front of a backend or a status page.

Every option is checked in :meth:`Options.postOptions`, so that a bad value
stops ``twistd`` with one line naming the option instead of a traceback from
the middle of start-up.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from twisted_sesscache import __version__
from twisted_sesscache.cache import DEFAULT_TIMEOUT, SESSION_ID_CONTEXT_MAX, SessionCache
from twisted_sesscache._openssl import runtime as openssl_runtime
from twisted_sesscache.settings import cache_from_strings, certificate_from_strings, spelling

# How twistd spells each setting, for error messages (see settings.py).
SPELLING = spelling(
    {
        "mode": "session-cache-mode",
        "size": "session-cache-size",
        "timeout": "session-timeout",
        "flush_interval": "flush-interval",
        "session_id_context": "session-id-context",
        "keep_sessions_on_truncation": "strict-truncation",
        "store_key_file": "store-key-file",
        "store_timeout": "store-timeout",
        "ticket_key_rotation": "ticket-key-rotation",
        "private_key": "private-key",
    },
    prefix="--",
)

DEFAULT_LISTEN = "tcp:8443:interface=127.0.0.1"
TLS_PREFIXES = ("ssl", "sesscache")  # endpoints that already speak TLS


# -- options ------------------------------------------------------------------------


class Options(usage.Options):
    """Options of ``twistd sesscache``; after parsing, also the cache and TLS options they make."""

    synopsis = "[options]"
    longdesc = (
        "Terminates TLS with OpenSSL's server-side session cache turned on, so that "
        "returning clients resume their sessions. With --upstream, the decrypted "
        "stream goes to a backend; without it, a status page shows each visitor "
        "whether their connection resumed."
    )
    optFlags = [
        ["generate-certificate", None, "Make a throwaway self-signed certificate for localhost "
         "(kept in --data-dir when given, so restarts keep it)."],
        ["upstream-tls", None, "Speak TLS to --upstream, verifying it; with --session-cache-mode "
         "client or both, the upstream leg resumes its sessions."],
    ]
    optParameters = [
        ["listen", None, DEFAULT_LISTEN, "Stream server endpoint to listen on; TLS is added on top of it."],
        ["certificate", None, None, "PEM file with the certificate (and its chain; and the key, "
         "unless --private-key is given)."],
        ["private-key", None, None, "PEM file with the private key of --certificate."],
        ["data-dir", None, None, "Directory for generated files (with --generate-certificate)."],
        ["upstream", None, None, "Client endpoint of the backend that receives the decrypted "
         "stream, e.g. tcp:127.0.0.1:8080. Without it, a status page is served."],
        ["session-cache-mode", None, "server", "off, client, server or both, optionally followed by "
         "modifiers joined with commas: no-auto-clear, no-internal-lookup, no-internal-store, "
         "no-internal, update-time (example: server,no-auto-clear)."],
        ["session-cache-size", None, None, "Most sessions kept; 0 means no limit "
         "[default: OpenSSL's 20480]. Needs the shared-OpenSSL runtime."],
        ["session-timeout", None, str(DEFAULT_TIMEOUT), "Session lifetime in seconds."],
        ["flush-interval", None, None, "Flush expired sessions every this many seconds from the "
         "reactor (implies no-auto-clear); 0 leaves it to OpenSSL's automatic clear every 255 "
         "sessions [default: 0]. Needs the shared-OpenSSL runtime."],
        ["session-id-context", None, None, "Sessions resume only between listeners sharing this "
         f"text (1 to {SESSION_ID_CONTEXT_MAX} bytes) [default: derived from the certificate and "
         "the verification settings]."],
        ["stats", None, None, "Stream server endpoint of an HTTP listener serving /stats.json and "
         "/metrics (Prometheus), e.g. tcp:9443:interface=127.0.0.1."],
        ["upstream-ca", None, None, "With --upstream-tls: PEM file (or directory) of the CA certificates "
         "the backend is verified against [default: the platform's trust store]."],
        ["upstream-hostname", None, None, "With --upstream-tls: the name the backend's certificate must "
         "carry, also sent as SNI [default: the host of --upstream]."],
        ["upstream-certificate", None, None, "With --upstream-tls: PEM file with a client certificate "
         "(and its key, unless --upstream-private-key is given)."],
        ["upstream-private-key", None, None, "With --upstream-tls: PEM file with the key of "
         "--upstream-certificate."],
        ["store", None, None, "Share sessions through a store: memory, or redis://[:password@]host:port/db "
         "(rediss:// for TLS to Redis). Server-side sharing needs the shared-OpenSSL runtime."],
        ["store-key-file", None, None, "File with the 32-byte key that seals what goes to --store; "
         "created with mode 0600 when absent. Every process sharing the store needs the same file."],
        ["store-timeout", None, "0.05", "Seconds a store lookup may take before the handshake goes on "
         "without it (a full handshake)."],
        ["ticket-key-rotation", None, "3600", "With --tickets shared: seconds between ticket key "
         "rotations; older keys still open tickets for one session timeout."],
    ]
    compData = usage.Completions(
        optActions={
            "certificate": usage.CompleteFiles("*.pem"),
            "private-key": usage.CompleteFiles("*.pem"),
            "data-dir": usage.CompleteDirs(),
            "session-cache-mode": usage.CompleteList(["off", "client", "server", "both"]),
        }
    )

    def __init__(self) -> None:
        super().__init__()
        self["tickets"] = False
        self["keep-sessions-on-truncation"] = True
        self.notes: list[str] = []

    def parseOptions(self, options: list[str] | None = None) -> None:
        # "--tickets shared" (or --tickets=shared) takes a value; a bare --tickets does not.
        if options is None:
            options = sys.argv[1:]
        rewritten: list[str] = []
        for word in options:
            if word == "shared" and rewritten[-1:] == ["--tickets"]:
                rewritten[-1] = "--shared-tickets"
            elif word == "--tickets=shared":
                rewritten.append("--shared-tickets")
            else:
                rewritten.append(word)
        super().parseOptions(rewritten)

    def opt_tickets(self) -> None:
        """Stateless tickets with this process's own keys; `--tickets shared` shares keys through --store."""
        self["tickets"] = True

    def opt_shared_tickets(self) -> None:
        """Stateless tickets sealed with keys shared through --store, rotated every --ticket-key-rotation."""
        self["tickets"] = "shared"

    def opt_no_tickets(self) -> None:
        """No stateless tickets: TLS 1.3 gets stateful tickets kept in the cache [default]."""
        self["tickets"] = False

    def opt_keep_sessions_on_truncation(self) -> None:
        """Clients closing without close_notify keep their sessions (still reported as unclean) [default]."""
        self["keep-sessions-on-truncation"] = True

    def opt_strict_truncation(self) -> None:
        """A close without close_notify invalidates the session, as OpenSSL 3 does by itself."""
        self["keep-sessions-on-truncation"] = False

    def opt_version(self) -> None:
        """Print the version and the OpenSSL runtime in use, then exit."""
        print(version_text())
        sys.exit(0)

    # -- validation ----------------------------------------------------------

    def postOptions(self) -> None:
        try:
            self._check_endpoints()
            self["cache"] = self._make_cache()
            self._check_certificate()
            self["upstreamCreator"] = self._upstream_creator()
        except ValueError as error:
            raise usage.UsageError(str(error)) from None

    def _check_endpoints(self) -> None:
        """Parse the endpoint strings now: makeService would fail with a traceback."""
        from twisted.internet import reactor

        checks = [("--listen", serverFromString, self["listen"]), ("--stats", serverFromString, self["stats"]),
                  ("--upstream", clientFromString, self["upstream"])]
        for name, parse, description in checks:
            if description is None:
                continue
            prefix = description.split(":", 1)[0].strip().lower()
            if name == "--listen" and prefix in TLS_PREFIXES:
                raise ValueError(f"--listen takes a plain endpoint such as tcp:8443 (not {prefix}:); "
                                 "sesscache adds TLS itself")
            try:
                parse(reactor, description)
            except Exception as error:
                raise ValueError(f"{name}: cannot use {description!r}: {error}") from None

    def _check_certificate(self) -> None:
        if self["generate-certificate"]:
            if self["certificate"] or self["private-key"]:
                raise ValueError("--generate-certificate cannot be combined with --certificate/--private-key")
            self["certificate"], self["private-key"] = self._generate_certificate()
            try:
                self["certificateOptions"] = self._load_certificate()
            finally:
                if not self["data-dir"]:  # loaded into memory: the throwaway files can go
                    shutil.rmtree(Path(self["certificate"]).parent, ignore_errors=True)
        elif self["certificate"]:
            self["certificateOptions"] = self._load_certificate()
        elif self["private-key"]:
            raise ValueError("--private-key needs --certificate")
        else:
            raise ValueError("--certificate is required (or --generate-certificate for a throwaway one)")

    def _upstream_creator(self) -> Any:
        """The client connection creator of the upstream leg, or None for plain TCP."""
        tls_only = ("upstream-ca", "upstream-hostname", "upstream-certificate", "upstream-private-key")
        if not self["upstream-tls"]:
            given = [name for name in tls_only if self[name] is not None]
            if given:
                raise ValueError(f"--{given[0]} needs --upstream-tls")
            return None
        if not self["upstream"]:
            raise ValueError("--upstream-tls needs --upstream")
        from twisted.internet.ssl import optionsForClientTLS, platformTrust

        from twisted_sesscache.certs import CertificateError
        from twisted_sesscache.modes import CacheMode
        from twisted_sesscache.trust import load_client_certificate, load_trust_root

        hostname, port = self["upstream-hostname"], None
        host_and_port = _tcp_host_and_port(self["upstream"])
        if host_and_port is not None:
            hostname, port = hostname or host_and_port[0], host_and_port[1]
        if not hostname:
            raise ValueError("--upstream-hostname is required when --upstream is not tcp:HOST:PORT")
        try:
            trust = load_trust_root(self["upstream-ca"]) if self["upstream-ca"] else platformTrust()
        except CertificateError as error:
            raise ValueError(f"--upstream-ca: {error}") from None
        client_certificate = None
        if self["upstream-certificate"]:
            try:
                client_certificate = load_client_certificate(self["upstream-certificate"], self["upstream-private-key"])
            except CertificateError as error:
                name = "--upstream-private-key" if self["upstream-private-key"] and "key" in str(error) else \
                    "--upstream-certificate"
                raise ValueError(f"{name}: {error}") from None
        elif self["upstream-private-key"]:
            raise ValueError("--upstream-private-key needs --upstream-certificate")
        cache: SessionCache = self["cache"]
        if cache.mode & CacheMode.CLIENT:
            return cache.client_creator(hostname, trust_root=trust, client_certificate=client_certificate, port=port)
        return optionsForClientTLS(hostname, trustRoot=trust, clientCertificate=client_certificate)

    def _load_certificate(self) -> Any:
        return certificate_from_strings(
            self["certificate"], self["private-key"], SPELLING, enableSessionTickets=bool(self["tickets"])
        )

    def _generate_certificate(self) -> tuple[str, str]:
        from twisted_sesscache.certs import generate_self_signed

        if self["data-dir"]:
            directory = Path(self["data-dir"])
            cert, key = directory / "cert.pem", directory / "key.pem"
            if cert.exists() and key.exists():
                self.notes.append(f"Using the self-signed certificate generated earlier in {directory}")
                return str(cert), str(key)
        else:
            # Loaded into memory right away, then removed (see _check_certificate).
            directory = Path(tempfile.mkdtemp(prefix="sesscache-"))
        try:
            cert, key = generate_self_signed(directory)
        except OSError as error:
            raise ValueError(f"--data-dir: cannot write a certificate to {str(directory)!r}: {error.strerror}") from None
        self.notes.append(f"Generated a throwaway self-signed certificate for localhost"
                          f"{f' in {directory}' if self['data-dir'] else ''}")
        return str(cert), str(key)

    def _make_cache(self) -> SessionCache:
        tickets = {True: "yes", False: "no", "shared": "shared"}[self["tickets"]]
        return cache_from_strings(
            {
                "mode": self["session-cache-mode"],
                "size": self["session-cache-size"],
                "timeout": self["session-timeout"],
                "flush_interval": self["flush-interval"],
                "session_id_context": self["session-id-context"],
                "tickets": tickets,
                "keep_sessions_on_truncation": "yes" if self["keep-sessions-on-truncation"] else "no",
                "store": self["store"],
                "store_key_file": self["store-key-file"],
                "store_timeout": self["store-timeout"],
                "ticket_key_rotation": self["ticket-key-rotation"],
            },
            SPELLING,
        )


def _tcp_host_and_port(description: str) -> tuple[str, int] | None:
    """Host and port of a ``tcp:HOST:PORT`` (or ``host=``/``port=``) client endpoint string."""
    kind, _, rest = description.partition(":")
    if kind.strip().lower() not in ("tcp", "tcp6"):
        return None
    positional, named = [], {}
    for part in rest.split(":"):
        key, equals, value = part.partition("=")
        if equals:
            named[key] = value
        else:
            positional.append(part)
    host = named.get("host") or (positional[0] if positional else None)
    port = named.get("port") or (positional[1] if len(positional) > 1 else None)
    if not host or not port or not port.isdigit():
        return None
    return host, int(port)


def version_text() -> str:
    import OpenSSL
    import twisted

    return (f"twisted-sesscache {__version__} (Twisted {twisted.__version__}, pyOpenSSL {OpenSSL.__version__})\n"
            f"runtime: {openssl_runtime().describe()}")


# -- services -------------------------------------------------------------------------


class SessionCacheService(service.Service):
    """Says which runtime is active, once, and runs the cache's flush loop with the service."""

    log = Logger()

    def __init__(self, cache: SessionCache, clock: IReactorTime, notes: list[str] | None = None) -> None:
        self.cache = cache
        self.clock = clock
        self.notes = notes or []
        self._announced = False

    def privilegedStartService(self) -> None:
        # Before the listeners (later siblings) bind, so the runtime line comes first.
        super().privilegedStartService()
        self._announce()

    def startService(self) -> None:
        super().startService()
        self._announce()
        self.cache.start(self.clock)

    def _announce(self) -> None:
        if self._announced:
            return
        self._announced = True
        self.log.info("twisted-sesscache {version}, {runtime}", version=__version__, runtime=openssl_runtime().describe())
        for note in self.notes:
            self.log.info("{note}", note=note)

    def stopService(self) -> Deferred[None] | None:
        self.cache.stop()
        return super().stopService()  # type: ignore[no-any-return]


@implementer(IStreamServerEndpoint)
class _Announced:
    """Logs where the TLS listener listens, and how to watch resumption there."""

    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, upstream: str | None) -> None:
        self.endpoint = endpoint
        self.upstream = upstream

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.endpoint.listen(protocolFactory).addCallback(self._listening)  # type: ignore[no-any-return]

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


def _listener(endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> StreamServerEndpointService:
    listener = StreamServerEndpointService(endpoint, factory)
    # As strports.service does: failing to listen stops start-up instead of being logged and ignored.
    listener._raiseSynchronously = True
    return listener


def makeService(options: Options) -> service.MultiService:
    """The cache service, the TLS listener (proxy or status page) and the optional stats listener."""
    from twisted.internet import reactor

    from twisted_sesscache.endpoints import TLSServerEndpoint
    from twisted_sesscache.proxy import proxy_factory
    from twisted_sesscache.status import stats_site, status_site

    cache: SessionCache = options["cache"]
    top = service.MultiService()
    SessionCacheService(cache, reactor, options.notes).setServiceParent(top)  # type: ignore[arg-type]

    creator = cache.server_context_factory(options["certificateOptions"])
    factory = proxy_factory(reactor, options) if options["upstream"] else status_site(cache)
    tls = TLSServerEndpoint(serverFromString(reactor, options["listen"]), creator)
    _listener(_Announced(tls, options["upstream"]), factory).setServiceParent(top)

    if options["stats"]:
        _listener(serverFromString(reactor, options["stats"]), stats_site(cache, reactor)).setServiceParent(top)
    return top


__all__ = ["DEFAULT_LISTEN", "Options", "SessionCacheService", "makeService", "version_text"]

"""``twistd sesscache``: a TLS listener whose sessions resume, in front of a backend or a status page.

Every option is checked in :meth:`Options.postOptions`, so that a bad value
stops ``twistd`` with one line naming the option instead of a traceback from
the middle of start-up. Parsing reads the files named, and opens and creates
nothing: :func:`makeService` builds the cache, its store and the listeners.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.python import usage

from twisted_sesscache._openssl import runtime as openssl_runtime
from twisted_sesscache.cache import SessionCache
from twisted_sesscache.config import SETTINGS, CacheConfig, Tickets, option_spelling
from twisted_sesscache.exceptions import ConfigurationError, SessionCacheError
from twisted_sesscache.proxy_config import OPTIONS as PROXY_OPTIONS
from twisted_sesscache.proxy_config import ProxySettings, option_rows
from twisted_sesscache.sealing import check_key_file
from twisted_sesscache.server.alpn import parse_alpn
from twisted_sesscache.server.certificates import server_certificate, server_certificates
from twisted_sesscache.service import AnnouncedEndpoint, SessionCacheService, listener, version_text
from twisted_sesscache.upstream import UpstreamTLS
from twisted_sesscache.workers import default_store, worker_count

DEFAULT_LISTEN = "tcp:8443:interface=127.0.0.1"
TLS_PREFIXES = ("ssl", "sesscache")  # endpoints that already speak TLS
FLAGS = ("tickets", "keep_sessions_on_truncation")  # settings spelled as flags, not parameters
UPSTREAM_TLS_OPTIONS = ("upstream-ca", "upstream-hostname", "upstream-certificate", "upstream-private-key")


def _setting_parameters() -> list[list[Any]]:
    """One twistd parameter per CacheConfig setting, from the spelling table."""
    rows = []
    for setting in SETTINGS:
        if setting.name not in FLAGS:
            default = "" if setting.default is None else f" [default: {_shown(setting.default)}]"
            rows.append([setting.option, None, None, setting.help + default])
    return rows


def _shown(value: object) -> str:
    spelled = getattr(value, "spelled", None)
    return spelled() if callable(spelled) else str(value)


class Options(usage.Options):
    """Options of ``twistd sesscache``; after parsing, also the configuration and TLS options they make."""

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
        ["private-key", None, None, "PEM file with the private key of a single --certificate."],
        ["private-key-passphrase-file", None, None, "File whose first line is the passphrase of an "
         "encrypted private key (never asked for on the terminal)."],
        ["alpn", None, None, "Protocols to negotiate with clients by ALPN, in order of preference, "
         "e.g. h2,http/1.1 for a backend that speaks them; clients offering none of them go on "
         "without ALPN [default: none besides what the served protocol declares]."],
        ["data-dir", None, None, "Directory for generated files (with --generate-certificate)."],
        ["upstream", None, None, "Client endpoint of the backend that receives the decrypted "
         "stream, e.g. tcp:127.0.0.1:8080. Without it, a status page is served."],
        ["stats", None, None, "Stream server endpoint of an HTTP listener serving /stats.json and "
         "/metrics (Prometheus), e.g. tcp:9443:interface=127.0.0.1."],
        ["workers", None, "1", "Worker processes sharing the listening port, and their sessions through "
         "--store (with more than one, the default store is lmdb:DIR/sessions with DIR the --data-dir "
         "or a runtime directory); auto: one per CPU."],
        ["upstream-ca", None, None, "With --upstream-tls: PEM file (or directory) of the CA certificates "
         "the backend is verified against [default: the platform's trust store]."],
        ["upstream-hostname", None, None, "With --upstream-tls: the name the backend's certificate must "
         "carry, also sent as SNI [default: the host of --upstream]."],
        ["upstream-certificate", None, None, "With --upstream-tls: PEM file with a client certificate "
         "(and its key, unless --upstream-private-key is given)."],
        ["upstream-private-key", None, None, "With --upstream-tls: PEM file with the key of "
         "--upstream-certificate."],
        *_setting_parameters(),
        *option_rows(),
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
        self["tickets"] = Tickets.OFF
        self["certificate"] = None
        self["certificates"] = []
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

    def opt_certificate(self, path: str) -> None:
        # twistd's help shows the docstring as it is: one line.
        """PEM file with the certificate and its chain (and the key, unless --private-key is given). Repeat it for several certificates chosen by SNI, each file holding its key; the first serves clients that send no name or one no certificate lists."""  # noqa: E501
        self["certificates"].append(path)

    def opt_tickets(self) -> None:
        """Stateless tickets with this process's own keys; `--tickets shared` shares keys through --store."""
        self["tickets"] = Tickets.OWN

    def opt_shared_tickets(self) -> None:
        """Stateless tickets sealed with keys shared through --store, rotated every --ticket-key-rotation."""
        self["tickets"] = Tickets.SHARED

    def opt_no_tickets(self) -> None:
        """No stateless tickets: TLS 1.3 gets stateful tickets kept in the cache [default]."""
        self["tickets"] = Tickets.OFF

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
            self["workers"] = worker_count(self["workers"])
            self._check_endpoints()
            self["config"] = self._config()
            self["alpnProtocols"] = parse_alpn(self["alpn"] or "", setting="alpn")
            self._check_certificate()
            self["upstreamTLS"] = self._upstream_tls()
            self["proxySettings"] = self._proxy_settings()
        except ConfigurationError as error:
            raise usage.UsageError(error.spelled(option_spelling)) from None

    def _config(self) -> CacheConfig:
        given: dict[str, object] = {
            setting.name: self[setting.option] for setting in SETTINGS if setting.name not in FLAGS
        }
        given["tickets"] = self["tickets"]
        given["keep_sessions_on_truncation"] = self["keep-sessions-on-truncation"]
        # Workers share sessions through a store: an LMDB file when none is named (its key file is
        # created by the parent, before the workers start).
        default_key = None
        if self["workers"] > 1 and given["store"] is None:
            given["store"], default_key = default_store(self["data-dir"])
            given["store_key_file"] = given["store_key_file"] or default_key
        config = CacheConfig.from_strings(given).for_runtime(openssl_runtime())
        if config.store_key_file is not None and config.store_key_file != default_key:
            check_key_file(config.store_key_file, setting="store_key_file")
        return config

    def _check_endpoints(self) -> None:
        """Parse the endpoint strings now: makeService would fail with a traceback."""
        from twisted.internet import reactor

        checks = [("listen", serverFromString, self["listen"]), ("stats", serverFromString, self["stats"]),
                  ("upstream", clientFromString, self["upstream"])]
        for name, parse, description in checks:
            if description is None:
                continue
            prefix = description.split(":", 1)[0].strip().lower()
            if name == "listen" and prefix in TLS_PREFIXES:
                raise ConfigurationError("listen", f"takes a plain endpoint such as tcp:8443 (not {prefix}:); "
                                         "sesscache adds TLS itself")
            try:
                parse(reactor, description)
            except Exception as error:
                raise ConfigurationError(name, f"cannot use {description!r}: {error}") from None

    def _check_certificate(self) -> None:
        certificates = self["certificates"]
        if self["generate-certificate"]:
            if certificates or self["private-key"]:
                raise ConfigurationError("generate_certificate", "cannot be combined with --certificate/--private-key")
            self["certificate"], self["private-key"] = self._generate_certificate()
            try:
                self["certificateOptions"] = self._load_certificate()
            finally:
                if not self["data-dir"]:  # loaded into memory: the throwaway files can go
                    shutil.rmtree(Path(self["certificate"]).parent, ignore_errors=True)
        elif len(certificates) > 1:
            if self["private-key"]:
                raise ConfigurationError("private_key", "goes with a single --certificate; with several, "
                                         "each file holds its own key")
            self["certificateOptions"] = server_certificates(
                certificates, tickets=bool(self["config"].tickets), passphrase_file=self["private-key-passphrase-file"]
            )
        elif certificates:
            self["certificate"] = certificates[0]
            self["certificateOptions"] = self._load_certificate()
        elif self["private-key"]:
            raise ConfigurationError("private_key", "needs --certificate")
        else:
            raise ConfigurationError("certificate", "required (or --generate-certificate for a throwaway one)")

    def _load_certificate(self) -> Any:
        return server_certificate(self["certificate"], self["private-key"], tickets=bool(self["config"].tickets),
                                  passphrase_file=self["private-key-passphrase-file"])

    def _upstream_tls(self) -> UpstreamTLS | None:
        if not self["upstream-tls"]:
            given = [name for name in UPSTREAM_TLS_OPTIONS if self[name] is not None]
            if given:
                raise ConfigurationError(given[0].replace("-", "_"), "needs --upstream-tls")
            return None
        if not self["upstream"]:
            raise ConfigurationError("upstream_tls", "needs --upstream")
        return UpstreamTLS.load(self["upstream"], self["upstream-hostname"], self["upstream-ca"],
                                self["upstream-certificate"], self["upstream-private-key"])

    def _proxy_settings(self) -> ProxySettings:
        given = {name: self[option] for name, option, _ in PROXY_OPTIONS}
        if not self["upstream"]:
            unused = [name for name in given if name != "handshake_timeout" and given[name] is not None]
            if unused:
                raise ConfigurationError(unused[0], "needs --upstream")
        return ProxySettings.from_strings(given)

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
            raise ConfigurationError(
                "data_dir", f"cannot write a certificate to {str(directory)!r}: {error.strerror}"
            ) from None
        self.notes.append(f"Generated a throwaway self-signed certificate for localhost"
                          f"{f' in {directory}' if self['data-dir'] else ''}")
        return str(cert), str(key)


# -- services -------------------------------------------------------------------------


def make_cache(options: Options) -> SessionCache:
    """The cache the options describe, with its store; a failure is one line and exit 1."""
    try:
        return SessionCache(config=options["config"])
    except SessionCacheError as error:
        message = error.spelled(option_spelling) if isinstance(error, ConfigurationError) else str(error)
        raise SystemExit(f"twistd sesscache: {message}") from None


def application_factory(options: Options, cache: SessionCache, reactor: Any) -> Any:
    """What speaks inside TLS: the proxy to --upstream, or the status page behind a handshake guard.

    Either one's counts join the cache's statistics.
    """
    from twisted_sesscache.handshakes import HandshakeFailures, HandshakeGuardFactory
    from twisted_sesscache.proxy import proxy_factory
    from twisted_sesscache.status import status_site

    settings: ProxySettings = options.get("proxySettings") or ProxySettings()
    handshakes = HandshakeFailures(reactor)
    if options["upstream"]:
        upstream_tls: UpstreamTLS | None = options["upstreamTLS"]
        factory: Any = proxy_factory(reactor, {
            "upstream": options["upstream"],
            "upstreamCreator": upstream_tls.creator(cache) if upstream_tls is not None else None,
            "settings": settings,
            "handshakeFailures": handshakes,
        })
        cache.report(factory.stats)
        return factory
    cache.report(lambda: handshakes.counts)
    return HandshakeGuardFactory(status_site(cache), handshakes, timeout=settings.handshake_timeout, clock=reactor)


def makeService(options: Options) -> service.MultiService:
    """The cache service, the TLS listener (proxy or status page) and the optional stats listener.

    With ``--workers`` above 1: the supervisor of worker processes instead (workers.py).
    """
    from twisted.internet import reactor

    from twisted_sesscache.endpoints import TLSServerEndpoint
    from twisted_sesscache.proxy import ProxyShutdownService
    from twisted_sesscache.status import stats_site

    if options["workers"] > 1:
        from twisted_sesscache.worker_setup import pool_service

        return pool_service(options, reactor)
    cache = make_cache(options)
    top = service.MultiService()
    SessionCacheService(cache, options.notes).setServiceParent(top)

    creator = cache.server_context_factory(options["certificateOptions"], options["alpnProtocols"])
    factory = application_factory(options, cache, reactor)
    tls = TLSServerEndpoint(serverFromString(reactor, options["listen"]), creator)
    listener(AnnouncedEndpoint(tls, options["upstream"]), factory).setServiceParent(top)
    if options["upstream"]:
        # Stopped with the listener: that one stops accepting, this one waits for what was accepted.
        ProxyShutdownService(factory).setServiceParent(top)

    if options["stats"]:
        listener(serverFromString(reactor, options["stats"]), stats_site(cache, reactor)).setServiceParent(top)
    return top


__all__ = ["DEFAULT_LISTEN", "Options", "SessionCacheService", "application_factory", "makeService", "version_text"]

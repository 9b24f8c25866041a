"""One worker of ``twistd sesscache --workers N``: ``python -m twisted_sesscache.worker INDEX OPTIONS...``.

Started by :class:`~twisted_sesscache.workers.WorkerPool` with the listening
socket as descriptor 3. It parses the same options ``twistd sesscache``
does, builds the same cache and application, adopts the socket, and answers
the parent's commands (stdin in, descriptor 4 out). SIGTERM (or the parent
going away) drains it: it stops accepting, lets its connections finish for
up to DRAIN_SECONDS, then stops. SIGHUP re-reads the certificate and key:
connections already open keep theirs, new ones get the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
from typing import Any

from OpenSSL import crypto
from twisted.application import service
from twisted.internet import stdio
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import ILogObserver, Logger, eventAsText, globalLogBeginner
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from zope.interface import implementer, provider

from twisted_sesscache.cache import SessionCache
from twisted_sesscache.config import option_spelling
from twisted_sesscache.exceptions import ConfigurationError
from twisted_sesscache.proxy import ProxyShutdownService
from twisted_sesscache.server.certificates import server_certificate, server_certificates
from twisted_sesscache.server.creator import SessionServerCreator
from twisted_sesscache.service import SessionCacheService
from twisted_sesscache.tap import Options, application_factory, make_cache
from twisted_sesscache.workers import ANSWER_FD, DRAIN_SECONDS, LISTEN_FD


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableCreator:
    """The server connection creator of the moment: a reload swaps it, open connections keep theirs."""

    def __init__(self, current: SessionServerCreator) -> None:
        self.current = current

    def serverConnectionForTLS(self, tlsProtocol: Any) -> Any:
        return self.current.serverConnectionForTLS(tlsProtocol)


def fingerprint(certificate_options: Any) -> str:
    """Of the (default) certificate: one CertificateOptions, or the first of several chosen by SNI."""
    certificate = getattr(certificate_options, "certificate", None)
    if certificate is None:
        certificate = certificate_options.keys[0].chain[0]
    der = crypto.dump_certificate(crypto.FILETYPE_ASN1, certificate)
    return hashlib.sha256(der).hexdigest()[:16]


def load_certificates(options: Options) -> Any:
    """The certificate options read again from the files named, as option parsing read them."""
    tickets, passphrase = bool(options["config"].tickets), options["private-key-passphrase-file"]
    paths = options["certificates"] or [options["certificate"]]
    if len(paths) > 1:
        return server_certificates(paths, tickets=tickets, passphrase_file=passphrase)
    return server_certificate(paths[0], options["private-key"], tickets=tickets, passphrase_file=passphrase)


class Worker:
    """The cache, the adopted port and the command channel of one worker process."""

    log = Logger()

    def __init__(self, options: Options, index: int, reactor: Any) -> None:
        self.options = options
        self.index = index
        self.reactor = reactor
        self.cache: SessionCache = make_cache(options)
        self.services = service.MultiService()
        SessionCacheService(self.cache).setServiceParent(self.services)
        self.creator = ReloadableCreator(self._creator(options["certificateOptions"]))
        self.certificate = fingerprint(options["certificateOptions"])
        application = application_factory(options, self.cache, reactor)
        if options["upstream"]:
            ProxyShutdownService(application).setServiceParent(self.services)  # waits for what was accepted
        self.factory = TLSMemoryBIOFactory(self.creator, False, application)
        self.port: Any = None
        self.draining = False

    def _creator(self, certificate_options: Any) -> SessionServerCreator:
        return self.cache.server_context_factory(certificate_options, self.options["alpnProtocols"])

    def start(self) -> None:
        self.services.startService()
        probe = socket.socket(fileno=os.dup(LISTEN_FD))
        family = probe.family
        probe.close()
        self.port = self.reactor.adoptStreamPort(LISTEN_FD, family, self.factory)
        os.close(LISTEN_FD)  # the reactor has its own copy
        stdio.StandardIO(Commands(self), stdin=0, stdout=ANSWER_FD, reactor=self.reactor)  # type: ignore[call-arg]
        self.log.info("Worker {index} (pid {pid}) accepting, certificate {certificate}",
                      index=self.index, pid=os.getpid(), certificate=self.certificate)

    # -- commands -----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {"stats": {**self.cache.stats(), "connections": len(self.factory.protocols),
                          "certificate": self.certificate}}

    def reload(self) -> dict[str, Any]:
        """Certificate and key read again from their files; on any error the old ones stay."""
        try:
            fresh = load_certificates(self.options)
        except ConfigurationError as error:
            self.log.error("Reload failed, the old certificate stays: {error}", error=error.spelled(option_spelling))
            return {"reloaded": False, "error": error.spelled(option_spelling)}
        self.creator.current = self._creator(fresh)
        self.certificate = fingerprint(fresh)
        return {"reloaded": True, "certificate": self.certificate}

    def drain(self) -> None:
        """Stop accepting; stop once the open connections are done (or DRAIN_SECONDS have passed)."""
        if self.draining:
            return
        self.draining = True
        if self.port is not None:
            self.port.stopListening()
        self._wait_for_connections(DRAIN_SECONDS * 10)

    def _wait_for_connections(self, turns_left: float) -> None:
        if self.factory.protocols and turns_left > 0:
            self.reactor.callLater(0.1, self._wait_for_connections, turns_left - 1)
            return
        if self.factory.protocols:
            self.log.warn("{count} connections still open after {seconds:g} s: closing them",
                          count=len(self.factory.protocols), seconds=DRAIN_SECONDS)
        stopped = self.services.stopService()
        if stopped is not None:
            stopped.addBoth(lambda _: self.reactor.stop())
        else:
            self.reactor.stop()


class Commands(LineOnlyReceiver):
    """The parent's commands, one a line; one JSON line answers each."""

    delimiter = b"\n"

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def lineReceived(self, line: bytes) -> None:
        command = line.strip().decode("ascii", "replace")
        handlers = {"stats": self.worker.stats, "reload": self.worker.reload}
        try:
            answer = handlers[command]() if command in handlers else {"error": f"unknown command {command!r}"}
        except Exception as error:
            self.worker.log.failure("Command {command} failed", command=command)
            answer = {"error": f"{type(error).__name__}: {error}"}
        self.sendLine(json.dumps(answer, default=str).encode())

    def connectionLost(self, reason: Any = None) -> None:
        """The parent has gone (or closed our stdin): finish up."""
        self.worker.drain()


@provider(ILogObserver)
def _log_to_stdout(event: dict[str, Any]) -> None:
    text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    from twisted.internet import reactor as installed

    reactor: Any = installed
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not argv[0].isdigit():
        print("usage: python -m twisted_sesscache.worker INDEX [twistd sesscache options]", file=sys.stderr)
        return 2
    index, arguments = int(argv[0]), argv[1:]
    options = Options()
    try:
        options.parseOptions(arguments)
    except usage.UsageError as error:
        print(f"twistd sesscache worker {index}: {error}", file=sys.stderr)
        return 1
    globalLogBeginner.beginLoggingTo([_log_to_stdout], redirectStandardIO=False)
    worker = Worker(options, index, reactor)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; a terminal's ^C reaches it too
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(worker.drain))
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(worker.reload))
    reactor.callWhenRunning(worker.start)
    reactor.run(installSignalHandlers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

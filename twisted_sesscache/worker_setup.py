"""The parent's side of ``twistd sesscache --workers N``: what it prepares before the workers start.

Everything workers would race on, or that must be the same in all of them,
is settled here once: the runtime directory, the sealing key file, the LMDB
store's first opening (a damaged or foreign file is refused now, in one
line), the certificate files of a generated certificate, and the session-ID
context, derived from the certificate the parent loaded. The workers get the
options as ``twistd sesscache`` options, rebuilt from what was parsed.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from OpenSSL import crypto
from twisted.application import service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from twisted_sesscache import __version__
from twisted_sesscache._openssl import runtime as openssl_runtime
from twisted_sesscache.config import CacheConfig, Tickets, option_spelling
from twisted_sesscache.exceptions import ConfigurationError, KeyFileError
from twisted_sesscache.sealing import load_or_create_key_file
from twisted_sesscache.server.creator import derived_session_id_context
from twisted_sesscache.service import AnnouncedEndpoint, listener
from twisted_sesscache.stores import store_from_url
from twisted_sesscache.workers import WorkerPool, make_private_directory, runtime_directory
from twisted_sesscache.workerstats import pool_stats_site

# Parent-only options: never passed on to a worker.
PARENT_ONLY = frozenset(("workers", "stats", "generate-certificate", "certificate"))
TICKET_FLAGS = {Tickets.OFF: "--no-tickets", Tickets.OWN: "--tickets", Tickets.SHARED: "--tickets=shared"}


def fail(error: ConfigurationError) -> SystemExit:
    return SystemExit(f"twistd sesscache: {error.spelled(option_spelling)}")


def prepare_store(config: CacheConfig) -> None:
    """Create the key file before N workers would race to, and open an LMDB store once to check it."""
    if config.store_key_file is not None:
        try:
            load_or_create_key_file(config.store_key_file)
        except KeyFileError as error:
            raise fail(ConfigurationError("store_key_file", str(error))) from None
    if isinstance(config.store, str) and config.store.lower().startswith("lmdb:"):
        try:
            store = store_from_url(config.store, size=config.size_limit)
        except ValueError as error:
            raise fail(ConfigurationError("store", str(error))) from None
        store.close()


def write_certificate(options: Any, directory: str) -> tuple[str, str]:
    """A generated (in-memory) certificate as files the workers can read, mode 0600."""
    certificate_options = options["certificateOptions"]
    paths = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    contents = (crypto.dump_certificate(crypto.FILETYPE_PEM, certificate_options.certificate),
                crypto.dump_privatekey(crypto.FILETYPE_PEM, certificate_options.privateKey))
    for path, content in zip(paths, contents):
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
    return paths


def worker_arguments(options: Any, overrides: dict[str, str | None]) -> list[str]:
    """The parsed options as ``twistd sesscache`` options again, minus the parent's own."""
    certificates = [overrides["certificate"]] if "certificate" in overrides else (
        options["certificates"] or [options["certificate"]])
    arguments = [f"--certificate={path}" for path in certificates]
    for name, _short, _default, _help in type(options).optParameters:
        value = overrides.get(name, options[name])
        if name not in PARENT_ONLY and value is not None:
            arguments.append(f"--{name}={value}")
    for name, *_ in type(options).optFlags:
        if name not in PARENT_ONLY and options[name]:
            arguments.append(f"--{name}")
    arguments.append(TICKET_FLAGS[options["tickets"]])
    if not options["keep-sessions-on-truncation"]:
        arguments.append("--strict-truncation")
    return arguments


def pool_service(options: Any, reactor: Any) -> service.MultiService:
    """The supervisor of ``options["workers"]`` workers and the one stats listener."""
    config: CacheConfig = options["config"]
    directory = runtime_directory(options["data-dir"])
    try:
        created = make_private_directory(directory) if not options["data-dir"] else False
    except ConfigurationError as error:
        raise fail(error) from None
    prepare_store(config)
    overrides: dict[str, str | None] = {"store": config.store if isinstance(config.store, str) else None,
                 "store-key-file": config.store_key_file}
    if config.session_id_context is None:
        # Derived once, from the first certificate: a certificate renewed by SIGHUP keeps it.
        derived = derived_session_id_context(options["certificateOptions"])
        if derived is not None:
            overrides["session-id-context"] = derived.decode("ascii")
    if options["generate-certificate"] and not options["data-dir"]:
        overrides["certificate"], overrides["private-key"] = write_certificate(options, directory)

    def cleanup() -> None:
        if created:
            shutil.rmtree(directory, ignore_errors=True)

    endpoint = AnnouncedEndpoint(serverFromString(reactor, options["listen"]), options["upstream"])
    pool = WorkerPool(reactor, endpoint, options["workers"], worker_arguments(options, overrides), cleanup=cleanup)
    top = service.MultiService()
    Announcement(pool, config, options.notes).setServiceParent(top)
    pool.setServiceParent(top)
    if options["stats"]:
        listener(serverFromString(reactor, options["stats"]), pool_stats_site(pool)).setServiceParent(top)
    return top


class Announcement(service.Service):
    """The start-up lines: version, runtime, how many workers share which store."""

    log = Logger()

    def __init__(self, pool: WorkerPool, config: CacheConfig, notes: list[str]) -> None:
        self.pool = pool
        self.config = config
        self.notes = notes

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        runtime = openssl_runtime()
        self.log.info("twisted-sesscache {version}, {runtime}", version=__version__, runtime=runtime.describe())
        self.log.info("{count} workers share sessions through {store}", count=self.pool.count, store=self.config.store)
        if not runtime.shared:
            self.log.warn("Under PyPI's OpenSSL wheels, OpenSSL's session callbacks are out of reach: each worker "
                          "resumes only its own server sessions (install pyOpenSSL on the system libssl to share)")
        for note in self.notes:
            self.log.info("{note}", note=note)


__all__ = ["pool_service", "prepare_store", "worker_arguments"]

"""The one load generator: stdlib ``ssl`` clients in a few worker processes, loopback only.

The stdlib ``ssl`` module of ``/usr/bin/python3`` links the system OpenSSL, so
every server is measured with the same client, whatever it is written in.
Each run is bounded twice, by a connection count and by wall time, whichever
comes first. Workers are separate processes so that the client side is not
serialised by the GIL; they share nothing but a start signal and one progress
slot each.
"""

from __future__ import annotations

import multiprocessing
import queue
import random
import socket
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

HOST = "127.0.0.1"
REQUEST = b"GET /ok HTTP/1.0\r\nHost: localhost\r\n\r\n"
CONNECT_TIMEOUT = 10.0
TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True)
class Job:
    """One bounded run against the TLS ports of one configuration."""

    ports: tuple[int, ...]
    tls: str
    resume: bool
    max_connections: int
    max_seconds: float
    workers: int = 2

    def __post_init__(self) -> None:
        if self.tls not in TLS_VERSIONS:
            raise ValueError(f"TLS version must be one of {', '.join(TLS_VERSIONS)}, not {self.tls!r}")
        if not self.ports:
            raise ValueError("a job needs at least one port")


@dataclass
class Outcome:
    """What one run measured; rates are per wall second over all workers."""

    connections: int = 0
    resumed: int = 0
    errors: int = 0
    seconds: float = 0.0
    client_cpu_seconds: float = 0.0
    offered: int = 0
    first_error: str = ""

    @property
    def rate(self) -> float:
        return self.connections / self.seconds if self.seconds > 0 else 0.0

    @property
    def resumption_ratio(self) -> float:
        return self.resumed / self.connections if self.connections else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rate": self.rate, "resumption_ratio": self.resumption_ratio}


@dataclass
class _WorkerResult:
    connections: int = 0
    resumed: int = 0
    errors: int = 0
    started: float = 0.0
    ended: float = 0.0
    cpu: float = 0.0
    first_error: str = ""
    offered: int = 0
    samples: list[bool] = field(default_factory=list)


def client_context(tls: str) -> ssl.SSLContext:
    """A client context pinned to one TLS version.

    Certificates are not verified: every server here uses a throwaway
    self-signed one, and verification would only add client work that is the
    same for every server.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = TLS_VERSIONS[tls]
    return context


def connect_once(
    context: ssl.SSLContext, port: int, session: ssl.SSLSession | None
) -> tuple[bool, ssl.SSLSession | None]:
    """One HTTP/1.0 request over a fresh TLS connection; (resumed?, session to offer next).

    The whole answer is read before taking the session: TLS 1.3 tickets come
    after the handshake. The close sends close_notify; a server that closed
    the TCP connection first makes ``unwrap`` fail, which is fine.
    """
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        raw.settimeout(CONNECT_TIMEOUT)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.connect((HOST, port))
        tls = context.wrap_socket(raw, server_hostname="localhost", session=session)
    except BaseException:
        raw.close()
        raise
    with tls:
        tls.sendall(REQUEST)
        answer = tls.recv(4096)
        if not answer.startswith(b"HTTP/1."):
            raise ConnectionError(f"not an HTTP answer: {answer[:40]!r}")
        while tls.recv(4096):
            pass
        resumed = bool(tls.session_reused)
        # A resumed TLS 1.2 session is the one offered; reading it back costs
        # the client a copy. TLS 1.3 sends a fresh ticket on every connection.
        next_session = session if resumed and tls.version() == "TLSv1.2" else tls.session
        try:
            tls.unwrap()
        except (OSError, ssl.SSLError, ValueError):
            pass
    return resumed, next_session


def _pick_port(ports: Sequence[int], index: int, chooser: random.Random | None) -> int:
    """Alternate through the ports (or pick at random, like a load balancer)."""
    if chooser is not None:
        return ports[chooser.randrange(len(ports))]
    return ports[index % len(ports)]


def _throughput_worker(job: Job, index: int, quota: int, progress: Any, go: Any, results: Any) -> None:
    result = _WorkerResult()
    try:
        context = client_context(job.tls)
        session = None
        if job.resume:  # the first, full handshake is not part of the measured run
            _, session = connect_once(context, job.ports[index % len(job.ports)], None)
        go.wait()
        result.started = time.perf_counter()
        cpu = time.process_time()
        deadline = result.started + job.max_seconds
        attempt = index  # so that workers start on different ports
        while result.connections + result.errors < quota and time.perf_counter() < deadline:
            port = _pick_port(job.ports, attempt, None)
            attempt += 1
            try:
                resumed, fresh = connect_once(context, port, session if job.resume else None)
            except (OSError, ssl.SSLError, ConnectionError) as error:
                result.errors += 1
                result.first_error = result.first_error or f"{type(error).__name__}: {error}"
                continue
            result.connections += 1
            result.resumed += resumed
            if job.resume and fresh is not None:
                session = fresh
            progress[index] = result.connections + result.errors
        result.ended = time.perf_counter()
        result.cpu = time.process_time() - cpu
    except BaseException as error:  # reported, never lost in a child process
        result.first_error = result.first_error or f"{type(error).__name__}: {error}"
        result.ended = result.ended or time.perf_counter()
    results.put(result)


def run(job: Job, label: str = "", show_progress: bool | None = None) -> Outcome:
    """Run ``job``; show a progress bar on stderr when it is a terminal."""
    quotas = [job.max_connections // job.workers + (i < job.max_connections % job.workers) for i in range(job.workers)]
    return _run_workers(
        job.workers,
        lambda i, progress, go, results: (_throughput_worker, (job, i, quotas[i], progress, go, results)),
        total=job.max_connections,
        max_seconds=job.max_seconds,
        label=label,
        show_progress=show_progress,
    )


# -- returning clients ----------------------------------------------------------


@dataclass(frozen=True)
class Population:
    """``clients`` clients, each connecting ``visits`` times, spread over ``ports``.

    Each visit goes to a port chosen at random (seeded), as a load balancer
    without affinity would; each client offers the session of its previous
    visit. Resumption in a fleet without a shared store is then about
    1/len(ports).
    """

    ports: tuple[int, ...]
    tls: str
    clients: int
    visits: int
    workers: int = 2
    seed: int = 5
    max_seconds: float = 120.0


@dataclass
class HitRate:
    offered: int = 0
    resumed: int = 0
    errors: int = 0
    seconds: float = 0.0
    first_error: str = ""

    @property
    def ratio(self) -> float:
        return self.resumed / self.offered if self.offered else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def _population_worker(population: Population, index: int, progress: Any, go: Any, results: Any) -> None:
    result = _WorkerResult()
    try:
        context = client_context(population.tls)
        mine = range(index, population.clients, population.workers)
        sessions: dict[int, ssl.SSLSession | None] = dict.fromkeys(mine)
        chooser = random.Random(population.seed * 1000 + index)
        go.wait()
        result.started = time.perf_counter()
        deadline = result.started + population.max_seconds
        for _ in range(population.visits):  # every client visits once per round
            for client in mine:
                if time.perf_counter() > deadline:
                    break
                offered = sessions[client]
                try:
                    resumed, fresh = connect_once(context, _pick_port(population.ports, 0, chooser), offered)
                except (OSError, ssl.SSLError, ConnectionError) as error:
                    result.errors += 1
                    result.first_error = result.first_error or f"{type(error).__name__}: {error}"
                    continue
                if offered is not None:
                    result.offered += 1
                    result.resumed += resumed
                sessions[client] = fresh
                result.connections += 1
                progress[index] = result.connections + result.errors
        result.ended = time.perf_counter()
    except BaseException as error:
        result.first_error = result.first_error or f"{type(error).__name__}: {error}"
        result.ended = result.ended or time.perf_counter()
    results.put(result)


def hit_rate(population: Population, label: str = "", show_progress: bool | None = None) -> HitRate:
    """Resumed visits over visits that offered a session (each client's first visit offers none)."""
    outcome = _run_workers(
        population.workers,
        lambda i, progress, go, results: (_population_worker, (population, i, progress, go, results)),
        total=population.clients * population.visits,
        max_seconds=population.max_seconds,
        label=label,
        show_progress=show_progress,
    )
    return HitRate(
        offered=outcome.offered,
        resumed=outcome.resumed,
        errors=outcome.errors,
        seconds=outcome.seconds,
        first_error=outcome.first_error,
    )


# -- worker processes and progress ----------------------------------------------


def _run_workers(
    workers: int,
    target: Callable[[int, Any, Any, Any], tuple[Callable[..., None], tuple[Any, ...]]],
    *,
    total: int,
    max_seconds: float,
    label: str,
    show_progress: bool | None,
) -> Outcome:
    """Start the workers, release them together, draw progress, collect and sum results."""
    spawn: Any = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    progress = spawn.RawArray("l", workers)
    go = spawn.Event()
    results = spawn.Queue()
    processes = []
    for i in range(workers):
        function, args = target(i, progress, go, results)
        processes.append(spawn.Process(target=function, args=args, daemon=True))
    bar = ProgressBar(label, total, max_seconds, show_progress)
    collected: list[_WorkerResult] = []
    try:
        for process in processes:
            process.start()
        go.set()
        started = time.monotonic()
        grace = max_seconds + CONNECT_TIMEOUT * 2 + 30
        while len(collected) < workers and time.monotonic() - started < grace:
            try:
                collected.append(results.get(timeout=0.2))
            except queue.Empty:  # a worker still at work
                pass
            bar.update(sum(progress))
        bar.done(sum(progress))
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
    outcome = Outcome()
    for result in collected:
        outcome.connections += result.connections
        outcome.resumed += result.resumed
        outcome.errors += result.errors
        outcome.client_cpu_seconds += result.cpu
        outcome.offered += result.offered
        outcome.first_error = outcome.first_error or result.first_error
    if len(collected) < workers:
        outcome.first_error = outcome.first_error or f"{workers - len(collected)} worker(s) never reported"
    finished = [r for r in collected if r.started]
    if finished:
        outcome.seconds = max(r.ended for r in finished) - min(r.started for r in finished)
    return outcome


class ProgressBar:
    """A one-line text bar on stderr, drawn only on a terminal."""

    WIDTH = 30

    def __init__(self, label: str, total: int, max_seconds: float, show: bool | None = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.max_seconds = max_seconds
        self.show = sys.stderr.isatty() if show is None else show
        self.started = time.monotonic()
        self._last = 0.0

    def _fraction(self, count: int) -> float:
        by_time = (time.monotonic() - self.started) / self.max_seconds if self.max_seconds else 0.0
        return min(1.0, max(count / self.total, by_time))

    def update(self, count: int) -> None:
        now = time.monotonic()
        if not self.show or now - self._last < 0.1:
            return
        self._last = now
        filled = int(self._fraction(count) * self.WIDTH)
        sys.stderr.write(f"\r{self.label[:48]:<48} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {count:>7}")
        sys.stderr.flush()

    def done(self, count: int) -> None:
        """Clear the bar; the caller prints one line per measurement."""
        if self.show:
            sys.stderr.write("\r" + " " * (48 + self.WIDTH + 12) + "\r")
            sys.stderr.flush()


"""``twistd sesscache --workers N``: one listening port, N worker processes, one supervisor.

The parent opens the TLS listener's port once and never accepts on it; each
worker (``python -m twisted_sesscache.worker``) inherits the socket as file
descriptor 3 and adopts it (``adoptStreamPort``), so the kernel hands each new
connection to whichever worker accepts first. A shared socket rather than
``SO_REUSEPORT``: connections queued when a worker dies stay in the one queue
for the others (with ``SO_REUSEPORT`` the dead worker's queue is reset), a
privileged port is bound once, port 0 works, and any stream endpoint that
yields a socket can be shared.

The parent supervises: a worker that dies is replaced, with a backoff that
grows while workers keep dying young; SIGTERM drains every worker (it stops
accepting and finishes its connections); SIGHUP has every worker re-read its
certificate and key. Sessions move between workers through the store, by
default an LMDB file beside the runtime files, and every worker uses the
session-ID context derived once, here, from the first certificate, so a
renewed certificate does not orphan the sessions made before it.

Each worker talks to the parent over two pipes: commands (``stats``,
``reload``) on its stdin, one JSON line per command on descriptor 4; its log
lines on stdout, relayed into the parent's log.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_sesscache.exceptions import ConfigurationError

LISTEN_FD = 3  # the worker's copy of the listening socket
ANSWER_FD = 4  # the worker's answers to the parent's commands
ANSWER_TIMEOUT = 5.0
DRAIN_SECONDS = 10.0  # a worker finishes its connections for this long before it stops anyway
FIRST_BACKOFF, MAX_BACKOFF, YOUNG = 0.25, 30.0, 10.0  # seconds
DEFAULT_STORE_NAME = "sessions"


def usable_cpus() -> int:
    """The CPUs this process may run on: ``taskset`` and cgroup cpusets narrow it, as nginx's ``auto`` does."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def worker_count(text: str | int | None) -> int:
    """``--workers``: a whole number of at least 1, or ``auto`` (one per CPU this process may run on)."""
    if text is None or isinstance(text, int):
        return text or 1
    word = text.strip().lower()
    if word == "auto":
        return usable_cpus()
    try:
        count = int(word)
    except ValueError:
        raise ConfigurationError("workers", f"must be a whole number of 1 or more, or auto, not {text!r}") from None
    if count < 1:
        raise ConfigurationError("workers", f"must be a whole number of 1 or more, or auto, not {text!r}")
    return count


def runtime_directory(data_dir: str | None) -> str:
    """Where the workers' shared files go: ``--data-dir``, else a directory of this parent's own."""
    if data_dir:
        return data_dir
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return os.path.join(base, f"sesscache-{os.getuid()}-{os.getpid()}")


def default_store(data_dir: str | None) -> tuple[str, str]:
    """The store and key file workers share when ``--store`` is not given."""
    directory = runtime_directory(data_dir)
    path = os.path.join(directory, DEFAULT_STORE_NAME)
    return f"lmdb:{path}", path + ".key"


def make_private_directory(path: str) -> bool:
    """Create ``path`` (mode 0700); true if created. An existing one must be ours and private."""
    try:
        os.mkdir(path, 0o700)
        return True
    except FileExistsError:
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise ConfigurationError(
                "data_dir", f"{path} exists and is not a private directory of this user: give --data-dir"
            ) from None
        return False


class WorkerProcess(ProcessProtocol):
    """The parent's end of one worker: its log lines, its answers, its end."""

    log = Logger()

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.started = time.monotonic()
        self.ended: Deferred[None] = Deferred()
        self._buffers: dict[int, bytes] = {}
        self._waiting: list[Deferred[dict[str, Any]]] = []
        self._pid: int | None = None

    @property
    def pid(self) -> int | None:
        return getattr(self.transport, "pid", None) or self._pid

    def connectionMade(self) -> None:
        self._pid = getattr(self.transport, "pid", None)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._buffers.get(childFD, b"") + data).split(b"\n")
        self._buffers[childFD] = lines.pop()
        for line in lines:
            if childFD == ANSWER_FD:
                self._answer(line)
            elif line.strip():
                self.log.info("[worker {index}] {line}", index=self.index, line=line.decode("utf-8", "replace"))

    def _answer(self, line: bytes) -> None:
        if not self._waiting:
            return
        waiting = self._waiting.pop(0)
        try:
            waiting.callback(json.loads(line))
        except ValueError:
            waiting.callback({"error": "unreadable answer"})

    def ask(self, command: str) -> Deferred[dict[str, Any]]:
        """Send one command; its answer, or ``{"error": ...}`` after ANSWER_TIMEOUT. Never fails."""
        if self.transport is None or self.ended.called or getattr(self.transport, "pid", None) is None:
            return succeed({"error": "not running"})
        answer: Deferred[dict[str, Any]] = Deferred()
        self._waiting.append(answer)
        self.transport.writeToChild(0, command.encode("ascii") + b"\n")
        answer.addTimeout(ANSWER_TIMEOUT, self.pool.reactor)

        def late(failure: Failure) -> dict[str, Any]:
            if answer in self._waiting:
                self._waiting.remove(answer)
            return {"error": f"no answer in {ANSWER_TIMEOUT:g} s"}

        return answer.addErrback(late)

    def signal(self, name: str) -> None:
        if getattr(self.transport, "pid", None) is not None:
            try:
                self.transport.signalProcess(name)  # type: ignore[union-attr]
            except Exception:  # already gone: processEnded follows
                pass

    def processEnded(self, reason: Failure) -> None:
        for waiting in self._waiting:
            waiting.callback({"error": "worker ended"})
        self._waiting.clear()
        self.pool.ended(self, reason)
        self.ended.callback(None)


class WorkerPool(service.Service):
    """Opens the port, keeps ``count`` workers running on it, forwards SIGHUP, drains on stop."""

    log = Logger()

    def __init__(self, reactor: Any, endpoint: Any, count: int, arguments: list[str],
                 cleanup: Callable[[], None] = lambda: None) -> None:
        self.reactor = reactor
        self.cleanup = cleanup
        self.endpoint = endpoint
        self.count = count
        self.arguments = arguments
        self.workers: dict[int, WorkerProcess] = {}
        self.port: Any = None
        self.stopping = False
        self._failures = dict.fromkeys(range(count), 0)
        self._previous_hup: Any = None

    def privilegedStartService(self) -> None:
        """Listen once, before twistd drops privileges; the parent itself never accepts."""
        super().privilegedStartService()
        listening = self.endpoint.listen(Factory())
        results: list[Any] = []
        listening.addBoth(results.append)
        if not results or isinstance(results[0], Failure):
            error = results[0].value if results else "the endpoint did not listen at once"
            raise SystemExit(f"twistd sesscache: --listen: cannot listen: {error}")
        self.port = results[0]
        self.port.stopReading()

    def startService(self) -> None:
        super().startService()
        for index in range(self.count):
            self.spawn(index)
        self._previous_hup = signal.signal(signal.SIGHUP, self._on_hup)

    def spawn(self, index: int) -> None:
        if self.stopping:
            return
        worker = WorkerProcess(self, index)
        self.workers[index] = worker
        command = [sys.executable, "-m", "twisted_sesscache.worker", str(index), *self.arguments]
        self.reactor.spawnProcess(
            worker, sys.executable, command, env=dict(os.environ),
            childFDs={0: "w", 1: "r", 2: "r", LISTEN_FD: self.port.fileno(), ANSWER_FD: "r"},
        )
        self.log.info("Worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def ended(self, worker: WorkerProcess, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self.stopping:
            return
        young = time.monotonic() - worker.started < YOUNG
        failures = self._failures[worker.index] = self._failures[worker.index] + 1 if young else 0
        delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** failures)
        self.log.warn("Worker {index} (pid {pid}) {how}; a new one starts in {delay:g} s",
                      index=worker.index, pid=worker.pid or "?", how=_how(reason), delay=delay)
        self.reactor.callLater(delay, self.spawn, worker.index)

    # -- signals ------------------------------------------------------------------------

    def _on_hup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> Deferred[list[dict[str, Any]]]:
        """Every worker re-reads its certificate and key; logs how each went."""
        self.log.info("SIGHUP: workers re-read their certificates and keys")
        answers = self.ask_all("reload")

        def report(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
            for answer in results:
                if answer.get("reloaded"):
                    self.log.info("Worker {worker} serves certificate {fingerprint}",
                                  worker=answer.get("worker"), fingerprint=answer.get("certificate"))
                else:
                    self.log.error("Worker {worker} kept its certificate: {error}",
                                   worker=answer.get("worker"), error=answer.get("error"))
            return results

        return answers.addCallback(report)

    def ask_all(self, command: str) -> Deferred[list[dict[str, Any]]]:
        """One command to every running worker; their answers, in worker order."""
        workers = [self.workers[index] for index in sorted(self.workers)]
        asked = [worker.ask(command) for worker in workers]

        def collect(results: list[tuple[bool, Any]]) -> list[dict[str, Any]]:
            answers = []
            for worker, (_, answer) in zip(workers, results):
                answers.append({"worker": worker.index, "pid": worker.pid, **answer})
            return answers

        return DeferredList(asked).addCallback(collect)

    # -- stopping -----------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        """Drain: each worker stops accepting and finishes; the port closes when all are gone."""
        super().stopService()
        self.stopping = True
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
        running = list(self.workers.values())
        for worker in running:
            worker.signal("TERM")
        late = self.reactor.callLater(DRAIN_SECONDS + 5, self._kill, running)
        done: Deferred[Any] = DeferredList([worker.ended for worker in running])

        def close(_: object) -> Any:
            if late.active():
                late.cancel()
            closed = self.port.stopListening() if self.port is not None else None
            self.cleanup()
            return closed

        return done.addCallback(close)

    def _kill(self, workers: list[WorkerProcess]) -> None:
        for worker in workers:
            if not worker.ended.called:
                self.log.warn("Worker {index} did not drain in time: killed", index=worker.index)
                worker.signal("KILL")


def _how(reason: Failure) -> str:
    error = reason.value
    if isinstance(error, ProcessTerminated):
        if error.signal is not None:
            return f"was killed by signal {error.signal}"
        return f"exited with status {error.exitCode}"
    return "exited"


__all__ = [
    "DEFAULT_STORE_NAME",
    "WorkerPool",
    "WorkerProcess",
    "default_store",
    "make_private_directory",
    "runtime_directory",
    "worker_count",
]

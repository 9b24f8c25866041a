"""Loopback ports and server processes: the one helper the bench and the tests share.

Free ports, waiting until a port accepts, and stopping a process (SIGTERM,
then SIGKILL) live here once. The module needs only the standard library:
the bench imports it without pulling in pytest or installing Twisted's
reactor (tests/support.py does both), and the tests import it without
anything else of the bench.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0


class ServerFailed(RuntimeError):
    """A server did not start; the message carries the end of its log when it has one."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(
    port: int,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    timeout: float = READY_TIMEOUT,
) -> None:
    """Return once 127.0.0.1:``port`` accepts; raise :class:`ServerFailed` if ``process`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerFailed(f"exited with {process.returncode} before listening on {port}{_tail(log, 2)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise ServerFailed(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s{_tail(log)}")


def tail(log: Path, lines: int = 6) -> str:
    """The last ``lines`` lines of a log, on one line."""
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _tail(log: Path | None, lines: int = 6) -> str:
    return f": {tail(log, lines)}" if log is not None else ""


def stop(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; the exit status.

    A process that leads its own process group (``start_new_session=True``)
    is signalled as a group, and what is left of the group (nginx workers)
    is killed after it exits; any other process is signalled alone.
    """
    if process.poll() is not None:
        return process.returncode
    group = _leads_group(process)
    _signal(process, signal.SIGTERM, group)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal(process, signal.SIGKILL, group)
        process.wait(timeout)
    if group:
        _signal(process, signal.SIGKILL, group)
    return process.returncode


def _leads_group(process: subprocess.Popen[bytes]) -> bool:
    try:
        return os.getpgid(process.pid) == process.pid
    except ProcessLookupError:
        return False


def _signal(process: subprocess.Popen[bytes], signum: int, group: bool) -> None:
    try:
        if group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
    except ProcessLookupError:
        pass


def spawn(
    command: list[str],
    log: Path | None = None,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own process group, so that :func:`stop` stops its children too.

    Its output goes to ``log`` (quoted by :func:`wait_for_port` when it fails to start), or nowhere.
    """
    with open(log if log is not None else os.devnull, "wb") as output:
        return subprocess.Popen(
            command,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


@contextmanager
def started(
    command: list[str],
    port: int,
    log: Path | None = None,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = READY_TIMEOUT,
) -> Iterator[subprocess.Popen[bytes]]:
    """:func:`spawn` ``command``, wait until ``port`` accepts, :func:`stop` it on the way out."""
    process = spawn(command, log, cwd=cwd, env=env)
    try:
        wait_for_port(port, process, log, timeout)
        yield process
    finally:
        stop(process)

"""``--profile``: where a Twisted server spends its CPU under resumed load, ours or not ours.

py-spy samples the server process while the load generator runs resumed
handshakes against it. Each sample is charged to one owner:

* *twisted-sesscache*: our own work (callbacks, ClientHello parsing, sealing,
  store lookups, counters), with the library calls and Deferred plumbing it
  causes, but not the handshake it hands back to Twisted;
* *pyOpenSSL + OpenSSL*: calls Twisted makes anyway, including those that only
  pass through our ``WatchedConnection`` wrapper to the same pyOpenSSL method;
* *Twisted*, and *other* (stdlib, zope, the bench's own tiny protocol).

Without ``--native``, py-spy charges time in C (the handshake itself) to
the Python frame that called it, which is what the split above needs. A
sample is taken whenever the thread is not idle, which includes time spent
in system calls and waiting for a CPU: the split is of busy wall time, and
the server CPU per connection (from /proc) is the number to compare.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench import load, servers

PROFILED = ("twisted-sessions", "sesscache-memory", "sesscache-memstore")
SECONDS = 5.0
RATE = 250  # samples per second
OURS = "twisted_sesscache/"
BENCH = "bench/"  # the harness sits beside the package, at the top of the checkout


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _frame(text: str) -> tuple[str, str]:
    """``"Class.method (path/file.py:12)"`` -> (function, path)."""
    function, _, where = text.rpartition(" (")
    return function, where.rsplit(":", 1)[0]


def _is_bench(path: str) -> bool:
    return path.startswith(BENCH) or f"/{BENCH}" in path


def _is_ours(path: str) -> bool:
    return OURS in path and not _is_bench(path)


def owner(stack: list[str]) -> str:
    """Who a sampled stack's CPU time belongs to (see the module docstring).

    The innermost frame that belongs to an application layer decides: ours
    (unless it only passes the call through to pyOpenSSL), Twisted's, or the
    bench's. Library frames below it (pyOpenSSL, cryptography, the stdlib,
    Deferred plumbing) are charged to whoever called them.
    """
    frames = [_frame(f) for f in stack]
    for index in range(len(frames) - 1, -1, -1):
        function, path = frames[index]
        if _is_ours(path):
            callee = frames[index + 1] if index + 1 < len(frames) else None
            passthrough = function.endswith("__getattr__") or (
                callee is not None
                and "OpenSSL/" in callee[1]
                and callee[0].rsplit(".", 1)[-1] == function.rsplit(".", 1)[-1]
            )
            if not passthrough:
                return "twisted-sesscache"
        elif ("twisted/" in path and "twisted/internet/defer.py" not in path) or _is_bench(path):
            break
    leaf = frames[-1][1] if frames else ""
    if "OpenSSL/" in leaf or "cffi" in leaf:
        return "pyOpenSSL + OpenSSL"
    if "twisted/" in leaf:
        return "Twisted"
    return "other"


def summarise(raw: str) -> tuple[Counter[str], Counter[str], int]:
    """Samples per owner, self samples per function of ours, total samples."""
    owners: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        count = int(count_text)
        stack = stack_text.split(";")
        total += count
        who = owner(stack)
        owners[who] += count
        if who == "twisted-sesscache":
            innermost = [function for function, path in map(_frame, stack) if _is_ours(path) and "__getattr__" not in function]
            ours[innermost[-1]] += count
    return owners, ours, total


def profile(certificate_pair: tuple[Path, Path], settings: Any, workdir: Path) -> list[dict[str, Any]] | str:
    """Per configuration and TLS version: server CPU per connection and the samples split by owner.

    Returns the reason instead when py-spy is missing.
    """
    spy = py_spy()
    if spy is None:
        return "py-spy is not installed (pip install py-spy)"
    certificate, private_key = certificate_pair
    rows: list[dict[str, Any]] = []
    for name in PROFILED:
        config = servers.BY_NAME[name]
        if config.unavailable():
            continue
        for tls in ("1.2", "1.3"):
            with tempfile.NamedTemporaryFile(suffix=".raw", dir=workdir, delete=False) as output:
                raw_path = Path(output.name)
            with servers.running(config, certificate, private_key, workdir / "profile") as server:
                sampler = subprocess.Popen(
                    [spy, "record", "--pid", str(server.processes[0].pid), "--format", "raw",
                     "--output", str(raw_path), "--duration", str(int(SECONDS)), "--rate", str(RATE)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                try:
                    cpu = server.cpu_seconds()
                    outcome = load.run(load.Job(server.ports, tls, True, 10**6, SECONDS, settings.workers), f"profile {name} TLS {tls}")
                    cpu = server.cpu_seconds() - cpu
                    sampler.wait(timeout=SECONDS + 30)
                finally:
                    if sampler.poll() is None:
                        sampler.kill()
                        sampler.wait()
            owners, ours, total = summarise(raw_path.read_text() if raw_path.exists() else "")
            row = {
                "config": name,
                "tls": tls,
                "connections": outcome.connections,
                "cpu_ms": cpu * 1000 / max(outcome.connections, 1),
                "samples": total,
                "owners": {who: count / total for who, count in owners.items()} if total else {},
                "ours": [(function, count / total) for function, count in ours.most_common(5)] if total else [],
            }
            rows.append(row)
            sys.stderr.write(f"  profiled {name:<20} TLS {tls}: {total} samples, {row['cpu_ms']:.2f} ms CPU per connection\n")
    return rows

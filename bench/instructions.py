"""``--parts instructions``: what a resumed connection costs the server, counted by callgrind.

Rates on a shared two-CPU machine move by 15 % from run to run, and so do the
ratios between them; the instructions a server executes per connection do
not (callgrind counts the same total twice, whatever else the machine does).
So each configuration's servers run under ``valgrind --tool=callgrind``; after
a warm-up their counters are zeroed (``callgrind_control -z``), one client
process makes a fixed number of resumed connections, and the counts are
dumped (``callgrind_control -d``) and summed over the configuration's
processes. Start-up and warm-up are not counted; helpers (redis-server) are
not counted either: this is the Twisted server's own cost.

Under valgrind a server runs some fifty times slower than natively, so the
one client is never what limits it, and the counts say nothing about
latency: only the work per connection, like for like.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import load, servers

CONFIGS = ("twisted-sessions", "sesscache-memory", "sesscache-memstore", "sesscache-lmdb",
           "sesscache-redis-1", "sesscache-redis", "sesscache-redis-tickets")  # fmt: skip
WARMUP = 100  # connections before counting: sessions made, caches and the reactor warm
CONNECTIONS = {"1.2": 400, "1.3": 200}  # counted, per configuration and TLS version
MAX_SECONDS = 300.0  # bound of each counted run, however slow valgrind is here
READY_TIMEOUT = 180.0  # Python's start-up under valgrind
# Work driven by time, not by connections (the reactor's flush, every 10 s by
# default), would be counted some fifty times too often per connection under
# callgrind's slowdown; the caches' flush runs as often per connection as natively.
FLUSH_INTERVAL = 500.0


def under_callgrind(config: servers.Config, dumps: Path) -> servers.Config:
    """``config`` with each of its server processes run by callgrind, its counts dumped under ``dumps``."""
    command = config.command

    def wrapped(launch: servers.Launch) -> list[str]:
        output = dumps / f"{config.name}-{launch.index}.%p"
        argv = command(launch)
        if "bench.tlsserver" in argv and "sesscache" in config.name:
            argv += ["--flush-interval", str(FLUSH_INTERVAL)]
        return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={output}", *argv]

    needs = (*config.needs, servers.executable("valgrind"), servers.executable("callgrind_control"))
    return dataclasses.replace(config, command=wrapped, needs=needs, ready_timeout=READY_TIMEOUT)


def dumped_instructions(path: Path) -> int:
    """The instruction total of one callgrind dump (its ``summary:`` or ``totals:`` line)."""
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise ValueError(f"{path} holds no instruction total")


def _control(flag: str, pid: int) -> None:
    subprocess.run(["callgrind_control", flag, str(pid)], capture_output=True, timeout=120, check=True)


def count(config: servers.Config, certificate: Path, private_key: Path, tls: str, workdir: Path) -> dict[str, Any]:
    """Instructions per resumed connection of ``config`` (all its processes) for one TLS version."""
    dumps = workdir / "callgrind" / f"{config.name}-{tls}"
    dumps.mkdir(parents=True, exist_ok=True)
    with servers.running(under_callgrind(config, dumps), certificate, private_key, workdir / "instructions") as server:
        load.run(load.Job(server.ports, tls, True, WARMUP, MAX_SECONDS, workers=1), f"warm {config.name} TLS {tls}")
        for process in server.processes:
            _control("-z", process.pid)
        outcome = load.run(load.Job(server.ports, tls, True, CONNECTIONS[tls], MAX_SECONDS, workers=1),
                           f"count {config.name} TLS {tls}")  # fmt: skip
        for process in server.processes:
            _control("-d", process.pid)
        total = sum(dumped_instructions(p) for p in dumps.glob("*.*.*"))  # the dumps, not the files at exit
    return {
        "config": config.name,
        "tls": tls,
        "connections": outcome.connections,
        "resumed": outcome.resumed,
        "errors": outcome.errors,
        "instructions": total / max(outcome.connections, 1),
    }


def measure(certificates: dict[str, tuple[Path, Path]], key: str, tls_versions: tuple[str, ...],
            workdir: Path) -> dict[str, Any]:  # fmt: skip
    """Every configuration of CONFIGS that can run here, for each TLS version, with one key type.

    ``rows``: one per configuration and TLS version; ``unavailable``: why the others could not run.
    """
    certificate, private_key = certificates[key]
    rows: list[dict[str, Any]] = []
    unavailable: dict[str, str] = {}
    for name in CONFIGS:
        config = under_callgrind(servers.BY_NAME[name], workdir)
        reason = config.unavailable()
        if reason:
            unavailable[name] = reason
            sys.stderr.write(f"instructions: {name} not available: {reason}\n")
            continue
        for tls in tls_versions:
            row = count(servers.BY_NAME[name], certificate, private_key, tls, workdir)
            row["key"] = key
            rows.append(row)
            sys.stderr.write(f"  {name:<20} TLS {tls}: {row['instructions'] / 1e6:.3f} M instructions per connection "
                             f"({row['resumed']}/{row['connections']} resumed)\n")  # fmt: skip
    return {"rows": rows, "unavailable": unavailable}

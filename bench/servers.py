"""The server configurations the bench compares, and the lifecycle of their processes.

A configuration is one entry of :data:`CONFIGS`: a command line to start (per
copy, for fleets), the helpers it needs running first (Redis), and the checks
that say whether its pieces exist here. Every process is started in its own
process group and stopped, the whole group, by the ``with`` block that
started it, with SIGKILL when SIGTERM is not enough.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import pool, processes

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Launch:
    """Everything a command line may refer to: files, ports, the copy's index."""

    certificate: Path
    private_key: Path
    workdir: Path
    port: int
    index: int = 0
    helper_ports: dict[str, int] = field(default_factory=dict)
    stats_port: int = 0

    def fill(self, template: str) -> str:
        """``{port}``, ``{stats}``, ``{cert}``, ``{key}``, ``{dir}``, ``{index}``, ``{python}`` and helper ports."""
        return template.format(
            port=self.port,
            stats=self.stats_port,
            cert=self.certificate,
            key=self.private_key,
            dir=self.workdir,
            index=self.index,
            python=sys.executable,
            **self.helper_ports,
        )


Command = Callable[[Launch], list[str]]
Check = Callable[[], "str | None"]  # a reason the configuration cannot run, or None


def template(*words: str) -> Command:
    """A command from words with ``{placeholders}`` (see :meth:`Launch.fill`)."""
    return lambda launch: [launch.fill(word) for word in words]


@dataclass(frozen=True)
class Helper:
    """A process a configuration needs before its servers (one per configuration)."""

    name: str
    command: Command
    needs: tuple[Check, ...] = ()


@dataclass(frozen=True)
class Config:
    """One server configuration: ``copies`` processes, the client alternating between them.

    ``stats``: the command serves ``/stats.json`` on ``{stats}`` (``twistd sesscache --stats``),
    which the bench reads before and after each run (per-worker counts, bench/pool.py).
    ``quick``: ``--quick`` measures it too (unless named by ``--only``, the full run only).
    ``ready_timeout``: seconds its servers may take to listen (longer under valgrind).
    """

    name: str
    label: str
    command: Command
    copies: int = 1
    helpers: tuple[Helper, ...] = ()
    needs: tuple[Check, ...] = ()
    stats: bool = False
    quick: bool = True
    ready_timeout: float = processes.READY_TIMEOUT

    def unavailable(self) -> str | None:
        """Why this configuration cannot run here, or None when it can."""
        for check in (*self.needs, *(c for h in self.helpers for c in h.needs)):
            reason = check()
            if reason:
                return reason
        return None


# -- checks -----------------------------------------------------------------------


def executable(name: str) -> Check:
    return lambda: None if shutil.which(name) else f"`{name}` is not installed (scripts/install-system-deps.sh)"


def importable(module: str) -> Check:
    """The module imports in a fresh interpreter (a broken module counts as missing)."""

    def check() -> str | None:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return f"`{module}` is not installed"
        status, last = _child_python(f"import {module}")
        return f"`{module}` is not importable ({last})" if status else None

    return check


def _child_python(code: str) -> tuple[int, str]:
    """Run ``code`` in a fresh interpreter of this checkout: its exit status and last line of stderr."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=child_environment(), timeout=60, check=False)  # fmt: skip
    return done.returncode, (done.stderr.strip().splitlines() or ["no error output"])[-1]


# -- command lines ----------------------------------------------------------------


def bench_server(config: str, *extra: str) -> Command:
    """The bench's own Twisted server (tlsserver.py) in one of its configurations."""
    return template(
        "{python}", "-m", "bench.tlsserver", config,
        "--port", "{port}", "--certificate", "{cert}", "--private-key", "{key}", *extra,
    )  # fmt: skip


def twistd_sesscache(*extra: str) -> Command:
    """``twistd -n sesscache`` with the option names of issue 2, plus ``extra``."""
    return template(
        "{python}", "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())",
        "-n", "--pidfile", "{dir}/twistd-{index}.pid", "--logfile", "-",
        "sesscache", "--listen", "tcp:{port}:interface=127.0.0.1",
        "--certificate", "{cert}", "--private-key", "{key}", *extra,
    )  # fmt: skip


NGINX_CONF = """\
worker_processes {workers};
events {{ worker_connections 1024; }}
http {{
    access_log off;
    default_type text/plain;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        ssl_session_timeout 5m;
        ssl_session_tickets off;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def nginx(workers: int = 1) -> Command:
    """nginx with ``workers`` worker processes sharing one session cache (``ssl_session_cache shared:``)."""

    def command(launch: Launch) -> list[str]:
        directory = launch.workdir / f"nginx-{launch.index}"
        directory.mkdir(parents=True, exist_ok=True)
        conf = directory / "nginx.conf"
        text = NGINX_CONF.replace("{dir}", str(directory)).replace("{workers}", str(workers))
        conf.write_text(launch.fill(text))
        return [
            "nginx", "-e", "stderr", "-p", str(directory), "-c", str(conf),
            "-g", f"daemon off; pid {directory}/nginx.pid; error_log stderr;",
        ]  # fmt: skip

    return command


HAPROXY_CONF = """\
global
    nbthread {threads}
    tune.ssl.cachesize 20480
    tune.ssl.lifetime 300
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend tls
    bind 127.0.0.1:{port} ssl crt {pem} ssl-min-ver TLSv1.2 no-tls-tickets
    http-request return status 200 content-type text/plain string "ok"
"""


def haproxy(threads: int = 2) -> Command:
    """HAProxy terminating TLS with ``threads`` threads and its own session cache, answering 200 itself.

    ``http-request return`` answers without a backend, like nginx's ``return 200``;
    tickets off and a 300 s session lifetime, as for the other servers.
    """

    def command(launch: Launch) -> list[str]:
        directory = launch.workdir / f"haproxy-{launch.index}"
        directory.mkdir(parents=True, exist_ok=True)
        pem = directory / "server.pem"  # HAProxy wants the certificate and its key in one file
        pem.write_bytes(launch.certificate.read_bytes() + launch.private_key.read_bytes())
        conf = directory / "haproxy.cfg"
        conf.write_text(HAPROXY_CONF.format(threads=threads, port=launch.port, pem=pem))
        return ["haproxy", "-db", "-f", str(conf)]

    return command


def s_server(launch: Launch) -> list[str]:
    """``openssl s_server -WWW`` serving a 3-byte file, session cache on, no tickets (like the others)."""
    directory = launch.workdir / f"s_server-{launch.index}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ok").write_text("ok\n")
    return [
        "openssl", "s_server", "-accept", f"127.0.0.1:{launch.port}",
        "-cert", str(launch.certificate), "-key", str(launch.private_key),
        "-WWW", "-quiet", "-no_ticket",
    ]  # fmt: skip


def twistd_option(option: str) -> Check:
    """``twistd sesscache`` takes ``--option`` (its plugin lands before some of its options)."""

    def check() -> str | None:
        code = (
            "import sys; from twisted_sesscache.tap import Options; "
            "names = {p[0] for p in Options.optParameters} | {f[0] for f in Options.optFlags}; "
            f"sys.exit(0 if {option.lstrip('-')!r} in names else 3)"
        )
        status, last = _child_python(code)
        if status == 3:
            return f"`twistd sesscache` has no {option} option yet"
        return f"`twisted_sesscache.tap` is not importable ({last})" if status else None

    return check


REDIS = Helper(
    "redis",
    template("redis-server", "--port", "{port}", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
    needs=(executable("redis-server"),),
)
TWISTD = importable("twisted_sesscache.tap")
WORKERS = (TWISTD, twistd_option("--workers"), twistd_option("--stats"))
# Every worker configuration serves /stats.json, for the per-worker counts (bench/pool.py).
STATS = ("--stats", "tcp:{stats}:interface=127.0.0.1")


def pinned(config: Config, cpus: str) -> Config:
    """``config`` under ``taskset -c cpus``: the server and every process it starts stay on those CPUs."""
    return Config(
        f"{config.name}@cpu{cpus}",
        f"{config.label}, taskset -c {cpus}",
        lambda launch: ["taskset", "-c", cpus, *config.command(launch)],
        config.copies,
        config.helpers,
        (*config.needs, executable("taskset")),
        config.stats,
        config.quick,
    )


# The configurations, in report order. A new one is one line here.
CONFIGS: tuple[Config, ...] = (
    Config("twisted-default", "Twisted CertificateOptions()", bench_server("default")),
    Config("twisted-sessions", "Twisted CertificateOptions(enableSessions=True)", bench_server("sessions")),
    Config("sesscache-memory", "SessionCache(), OpenSSL's cache", bench_server("sesscache")),
    Config("sesscache-memstore", "SessionCache(store=MemoryStore())", bench_server("sesscache-memstore")),
    Config("sesscache-lmdb", "SessionCache(store='lmdb:DIR')", bench_server("sesscache-lmdb", "--store-dir", "{dir}/lmdb-{index}"), needs=(importable("lmdb"),)),
    Config("sesscache-redis", "SessionCache(store='redis://…'), 2 processes", bench_server("sesscache-redis", "--store-dir", "{dir}", "--store-url", "redis://127.0.0.1:{redis}/0"), copies=2, helpers=(REDIS,)),
    Config("sesscache-redis-tickets", "SessionCache(store='redis://…', tickets='shared'), 2 processes", bench_server("sesscache-redis", "--store-dir", "{dir}", "--store-url", "redis://127.0.0.1:{redis}/0", "--tickets", "shared"), copies=2, helpers=(REDIS,)),
    Config("sesscache-redis-1", "SessionCache(store='redis://…'), 1 process", bench_server("sesscache-redis", "--store-dir", "{dir}", "--store-url", "redis://127.0.0.1:{redis}/0"), helpers=(REDIS,)),
    Config("twistd-sesscache-memory", "twistd sesscache", twistd_sesscache(), needs=(TWISTD,)),
    Config("twistd-sesscache-memstore", "twistd sesscache --store memory", twistd_sesscache("--store", "memory"), needs=(TWISTD, twistd_option("--store"))),
    Config("twistd-sesscache-lmdb", "twistd sesscache --store lmdb:DIR", twistd_sesscache("--store", "lmdb:{dir}/lmdb-{index}", "--store-key-file", "{dir}/store-{index}.key"), needs=(TWISTD, importable("lmdb"))),
    Config("twistd-sesscache-redis", "twistd sesscache --store redis, 2 processes", twistd_sesscache("--store", "redis://127.0.0.1:{redis}/0", "--store-key-file", "{dir}/store.key"), copies=2, helpers=(REDIS,), needs=(TWISTD, twistd_option("--store"))),
    Config("twistd-sesscache-redis-1", "twistd sesscache --store redis, 1 process", twistd_sesscache("--store", "redis://127.0.0.1:{redis}/0", "--store-key-file", "{dir}/store.key"), helpers=(REDIS,), needs=(TWISTD, twistd_option("--store"))),
    Config("twistd-workers-1", "twistd sesscache --workers 1 --store lmdb", twistd_sesscache("--workers", "1", "--store", "lmdb:{dir}/sessions-{index}", "--store-key-file", "{dir}/store-{index}.key", *STATS), needs=WORKERS, stats=True),
    Config("twistd-workers-2", "twistd sesscache --workers 2 (lmdb, the default)", twistd_sesscache("--workers", "2", *STATS), needs=WORKERS, stats=True),
    Config("twistd-workers-auto", f"twistd sesscache --workers auto ({os.cpu_count()} here)", twistd_sesscache("--workers", "auto", *STATS), needs=WORKERS, stats=True, quick=False),
    Config("nginx", "nginx 1 worker, ssl_session_cache shared", nginx(1), needs=(executable("nginx"),)),
    Config("nginx-2", "nginx 2 workers, ssl_session_cache shared", nginx(2), needs=(executable("nginx"),), quick=False),
    Config("haproxy", "HAProxy nbthread 2, its own session cache", haproxy(2), needs=(executable("haproxy"),), quick=False),
    Config("openssl-s_server", "openssl s_server (ceiling)", s_server, needs=(executable("openssl"),)),
)
BY_NAME = {config.name: config for config in CONFIGS}
# How throughput scales with cores: one and two workers, pinned to one CPU and to two.
SCALING_CPUS = ("0", "0,1")
SCALING: tuple[Config, ...] = tuple(
    pinned(BY_NAME[name], cpus) for cpus in SCALING_CPUS for name in ("twistd-workers-1", "twistd-workers-2")
)


# -- processes ----------------------------------------------------------------------


def child_environment() -> dict[str, str]:
    """This environment, with this checkout importable in child interpreters."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextmanager
def started(
    command: list[str], port: int, workdir: Path, name: str, timeout: float = processes.READY_TIMEOUT
) -> Iterator[subprocess.Popen[bytes]]:
    """Start one process in ``workdir`` (output in ``name.log``), wait until ``port`` accepts, stop it afterwards."""
    with processes.started(command, port, workdir / f"{name}.log", cwd=workdir, env=child_environment(),
                           timeout=timeout) as process:  # fmt: skip
        yield process


@dataclass
class Running:
    """A started configuration: the TLS ports to load and the processes behind them."""

    config: Config
    ports: tuple[int, ...]
    processes: list[subprocess.Popen[bytes]]
    stats_ports: tuple[int, ...] = ()  # one per copy when the configuration serves /stats.json
    helper_ports: dict[str, int] = field(default_factory=dict)
    workdir: Path | None = None

    def cpu_seconds(self) -> float:
        """User + system CPU of every live process in the configuration's process groups."""
        return sum(group_cpu_seconds(process.pid) for process in self.processes)

    def leader_cpu_seconds(self) -> float:
        """User + system CPU of the first process of each copy alone (a pool's supervisor)."""
        return sum(process_cpu_seconds(process.pid) for process in self.processes)

    def stats(self) -> list[dict[str, Any] | None]:
        """Each copy's ``/stats.json`` now (empty when the configuration serves none)."""
        return pool.snapshots(self.stats_ports)


@contextmanager
def running(
    config: Config,
    certificate: Path,
    private_key: Path,
    workdir: Path,
    copies: int | None = None,
) -> Iterator[Running]:
    """Start ``config`` (helpers first, then each copy); stop everything afterwards."""
    copies = copies or config.copies
    workdir = workdir / config.name
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        helper_ports: dict[str, int] = {}
        for helper in config.helpers:
            port = processes.free_port()
            launch = Launch(certificate, private_key, workdir, port)
            stack.enter_context(started(helper.command(launch), port, workdir, helper.name))
            helper_ports[helper.name] = port
        ports, children, stats_ports = [], [], []
        for index in range(copies):
            port = processes.free_port()
            stats_port = processes.free_port() if config.stats else 0
            launch = Launch(certificate, private_key, workdir, port, index, helper_ports, stats_port)
            command = config.command(launch)
            children.append(stack.enter_context(started(command, port, workdir, f"{config.name}-{index}", config.ready_timeout)))
            ports.append(port)
            if config.stats:
                processes.wait_for_port(stats_port, children[-1], workdir / f"{config.name}-{index}.log")
                if not pool.wait_ready(stats_port):
                    raise processes.ServerFailed(f"its workers did not all answer within {pool.READY_TIMEOUT:.0f} s")
                stats_ports.append(stats_port)
        yield Running(config, tuple(ports), children, tuple(stats_ports), helper_ports, workdir)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float:
    """CPU time of one live process (Linux /proc), 0 when it is gone or elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def group_cpu_seconds(pgid: int) -> float:
    """CPU time of the live processes in a process group (Linux /proc), 0 elsewhere."""
    total = 0
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command name: state, ppid, pgrp, ..., utime (12), stime (13).
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / _CLOCK_TICKS


def select(names: Sequence[str] | None, quick: bool = False) -> list[Config]:
    """The configurations named (all when None, or those marked ``quick``), in report order; unknown names are an error."""
    if not names:
        return [c for c in CONFIGS if c.quick or not quick]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown configuration(s): {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    return [c for c in CONFIGS if c.name in names]

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

from bench import processes

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

    def fill(self, template: str) -> str:
        """``{port}``, ``{cert}``, ``{key}``, ``{dir}``, ``{index}``, ``{python}`` and helper ports."""
        return template.format(
            port=self.port,
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
    """One server configuration: ``copies`` processes, the client alternating between them."""

    name: str
    label: str
    command: Command
    copies: int = 1
    helpers: tuple[Helper, ...] = ()
    needs: tuple[Check, ...] = ()

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
worker_processes 1;
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


def nginx(launch: Launch) -> list[str]:
    """nginx with one worker (like the one-process servers) and a shared session cache."""
    directory = launch.workdir / f"nginx-{launch.index}"
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(launch.fill(NGINX_CONF.replace("{dir}", str(directory))))
    return [
        "nginx", "-e", "stderr", "-p", str(directory), "-c", str(conf),
        "-g", f"daemon off; pid {directory}/nginx.pid; error_log stderr;",
    ]  # fmt: skip


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


# The configurations, in report order. A new one is one line here.
CONFIGS: tuple[Config, ...] = (
    Config("twisted-default", "Twisted CertificateOptions()", bench_server("default")),
    Config("twisted-sessions", "Twisted CertificateOptions(enableSessions=True)", bench_server("sessions")),
    Config("sesscache-memory", "SessionCache(), OpenSSL's cache", bench_server("sesscache")),
    Config("sesscache-memstore", "SessionCache(store=MemoryStore())", bench_server("sesscache-memstore")),
    Config("sesscache-lmdb", "SessionCache(store='lmdb:DIR')", bench_server("sesscache-lmdb", "--store-dir", "{dir}/lmdb-{index}"), needs=(importable("lmdb"),)),
    Config("twistd-sesscache-memory", "twistd sesscache", twistd_sesscache(), needs=(TWISTD,)),
    Config("twistd-sesscache-memstore", "twistd sesscache --store memory", twistd_sesscache("--store", "memory"), needs=(TWISTD, twistd_option("--store"))),
    Config("twistd-sesscache-lmdb", "twistd sesscache --store lmdb:DIR", twistd_sesscache("--store", "lmdb:{dir}/lmdb-{index}", "--store-key-file", "{dir}/store-{index}.key"), needs=(TWISTD, importable("lmdb"))),
    Config("twistd-sesscache-redis", "twistd sesscache --store redis, 2 processes", twistd_sesscache("--store", "redis://127.0.0.1:{redis}/0", "--store-key-file", "{dir}/store.key"), copies=2, helpers=(REDIS,), needs=(TWISTD, twistd_option("--store"))),
    Config("twistd-sesscache-redis-1", "twistd sesscache --store redis, 1 process", twistd_sesscache("--store", "redis://127.0.0.1:{redis}/0", "--store-key-file", "{dir}/store.key"), helpers=(REDIS,), needs=(TWISTD, twistd_option("--store"))),
    Config("nginx", "nginx 1 worker, ssl_session_cache shared", nginx, needs=(executable("nginx"),)),
    Config("openssl-s_server", "openssl s_server (ceiling)", s_server, needs=(executable("openssl"),)),
)
BY_NAME = {config.name: config for config in CONFIGS}


# -- processes ----------------------------------------------------------------------


def child_environment() -> dict[str, str]:
    """This environment, with this checkout importable in child interpreters."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextmanager
def started(command: list[str], port: int, workdir: Path, name: str) -> Iterator[subprocess.Popen[bytes]]:
    """Start one process in ``workdir`` (output in ``name.log``), wait until ``port`` accepts, stop it afterwards."""
    with processes.started(command, port, workdir / f"{name}.log", cwd=workdir, env=child_environment()) as process:
        yield process


@dataclass
class Running:
    """A started configuration: the TLS ports to load and the processes behind them."""

    config: Config
    ports: tuple[int, ...]
    processes: list[subprocess.Popen[bytes]]

    def cpu_seconds(self) -> float:
        """User + system CPU of every live process in the configuration's process groups."""
        return sum(group_cpu_seconds(process.pid) for process in self.processes)


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
        ports, children = [], []
        for index in range(copies):
            port = processes.free_port()
            launch = Launch(certificate, private_key, workdir, port, index, helper_ports)
            children.append(stack.enter_context(started(config.command(launch), port, workdir, f"{config.name}-{index}")))
            ports.append(port)
        yield Running(config, tuple(ports), children)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


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


def select(names: Sequence[str] | None) -> list[Config]:
    """The configurations named (all when None), in report order; unknown names are an error."""
    if not names:
        return list(CONFIGS)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown configuration(s): {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    return [c for c in CONFIGS if c.name in names]

"""``python -m bench [--quick]``: measure, then write docs/benchmarks.md and its chart.

The plan (which configurations, keys, TLS versions, how long) is decided
here; servers.py starts and stops the servers, load.py drives them, stall.py
measures flushes and memory, report.py writes the results down.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import instructions, load, pool, processes, report, servers, stall, store_bytes

DOCS = servers.REPO / "docs" / "benchmarks.md"
QUICK_OUTPUT = servers.REPO / "build" / "bench-quick" / "benchmarks.md"
PARTS = ("throughput", "hitrate", "scaling", "bytes", "stall", "instructions")
QUICK_PARTS = ("throughput", "hitrate", "stall")  # the others by --parts only
# Configurations in the hit-rate part: plain Twisted and every sesscache store.
HITRATE_CONFIGS = ("twisted-sessions", *report.MEMORY_STORES, report.REDIS_STORE)
# ... and the workers sharing one port (each run once: its workers are the fleet).
WORKER_HITRATE_CONFIGS = ("twistd-workers-1", "twistd-workers-2")


@dataclass(frozen=True)
class Settings:
    """How much to measure; ``--quick`` and the full run differ only here."""

    quick: bool
    keys: tuple[str, ...]
    tls: tuple[str, ...]
    rounds: int
    seconds: float
    max_connections: int
    workers: int
    clients: int
    visits: int
    fleets: tuple[int, ...]
    stall_sizes: tuple[int, ...]
    stall_repeats: int
    bytes_connections: int  # full handshakes that fill a store, for its bytes per session

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        if quick:
            return cls(True, ("rsa",), ("1.2",), 2, 1.5, 3000, 2, 20, 5, (1, 2), (10_000,), 2, 300)
        return cls(False, ("rsa", "ecdsa"), ("1.2", "1.3"), 2, 3.0, 20_000, 2, 60, 10, (1, 2, 3), (10_000, 100_000), 3, 2000)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        path = report.write(saved, Path(args.output or DOCS), with_chart=not args.no_chart)
        print(f"report written to {path}")
        return 0
    settings = Settings.for_mode(args.quick)
    overrides = {name: getattr(args, name) for name in ("rounds", "seconds", "workers") if getattr(args, name) is not None}
    if args.keys:
        overrides["keys"] = tuple(args.keys.split(","))
    if args.tls:
        overrides["tls"] = tuple(args.tls.split(","))
    settings = Settings(**{**asdict(settings), **overrides})
    parts = tuple(args.parts.split(",")) if args.parts else (QUICK_PARTS if settings.quick else PARTS)
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part(s): {', '.join(unknown)}; known: {', '.join(PARTS)}")
    configs = servers.select(args.only.split(",") if args.only else None, quick=settings.quick)
    output = Path(args.output) if args.output else (QUICK_OUTPUT if settings.quick else DOCS)

    signal.signal(signal.SIGTERM, _exit_on_signal)  # so that every finally block stops its servers
    started = time.monotonic()
    results: dict[str, Any] = {"settings": asdict(settings), "machine": report.machine(), "unavailable": {}}
    with tempfile.TemporaryDirectory(prefix="sesscache-bench-") as scratch:
        workdir = Path(scratch)
        certificates = _certificates(workdir, settings.keys)
        available = _available(configs, results["unavailable"])
        if "throughput" in parts:
            results["throughput"] = throughput(available, certificates, settings, workdir, results["unavailable"])
        if "hitrate" in parts:
            results["hitrate"] = hit_rates(available, certificates, settings, workdir, results["unavailable"])
        if "scaling" in parts:
            results["scaling"] = scaling(certificates, settings, workdir, results["unavailable"])
        if "bytes" in parts:
            results["bytes"] = store_bytes.measure(certificates, settings.keys[0], settings.tls,
                                                   settings.bytes_connections, workdir, results["unavailable"])  # fmt: skip
            results["lmdb_cost"] = store_bytes.lmdb_costs(workdir / "lmdb-cost")
        if "stall" in parts:
            results["stall"] = stall.measure(list(settings.stall_sizes), settings.stall_repeats)
        if "instructions" in parts:
            results["instructions"] = instructions.measure(certificates, settings.keys[0], settings.tls, workdir)
        if args.profile if args.profile is not None else not settings.quick:
            from bench import profiling

            profiled = profiling.profile(certificates[settings.keys[0]], settings, workdir)
            results["profile"] = profiled if isinstance(profiled, list) else {"unavailable": profiled}
    results["machine"]["load_after"] = report._loadavg()
    results["elapsed"] = time.monotonic() - started
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    path = report.write(results, output, with_chart=not args.no_chart)
    sys.stderr.write(f"\nreport written to {path} ({results['elapsed']:.0f} s)\n")
    print(report.markdown(results, None) if args.print else "", end="")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="TLS 1.2 RSA only, short runs (under 2 minutes)")
    parser.add_argument("--only", help=f"comma-separated configurations ({', '.join(servers.BY_NAME)})")
    parser.add_argument("--keys", help="comma-separated key types: rsa,ecdsa")
    parser.add_argument("--tls", help="comma-separated TLS versions: 1.2,1.3")
    parser.add_argument("--parts", help=f"comma-separated parts to run ({', '.join(PARTS)}; "
                                         f"default: all, or {', '.join(QUICK_PARTS)} with --quick)")  # fmt: skip
    parser.add_argument("--rounds", type=int, help="interleaved runs per measurement (the best counts)")
    parser.add_argument("--seconds", type=float, help="time bound of one run")
    parser.add_argument("--workers", type=int, help="client processes")
    parser.add_argument("--output", help="Markdown report path (the PNG goes beside it)")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--from-json", help="only rebuild the report from saved results")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG")
    parser.add_argument("--print", action="store_true", help="print the report on stdout too")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="profile the Twisted servers with py-spy (default: in the full run only)")  # fmt: skip
    return parser


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _certificates(workdir: Path, keys: tuple[str, ...]) -> dict[str, tuple[Path, Path]]:
    from twisted_sesscache.certs import generate_self_signed

    return {key: generate_self_signed(workdir / f"cert-{key}", key_type=key) for key in keys}


def _available(configs: list[servers.Config], unavailable: dict[str, str]) -> list[servers.Config]:
    ready = []
    for config in configs:
        reason = config.unavailable()
        if reason:
            unavailable[config.name] = reason
            sys.stderr.write(f"{config.name}: not available: {reason}\n")
        else:
            ready.append(config)
    return ready


def throughput(
    configs: list[servers.Config],
    certificates: dict[str, tuple[Path, Path]],
    settings: Settings,
    workdir: Path,
    unavailable: dict[str, str],
) -> list[dict[str, Any]]:
    """Full and resumed rates for every configuration, key type and TLS version.

    All configurations for one key type run at once (idle servers cost
    nothing), and the rounds of one measurement are interleaved across them,
    so that a burst of outside load hits every configuration, not just one.
    """
    rows = []
    for key in settings.keys:
        certificate, private_key = certificates[key]
        with ExitStack() as stack:
            live: list[servers.Running] = []
            for config in configs:
                try:
                    live.append(stack.enter_context(servers.running(config, certificate, private_key, workdir / key)))
                except processes.ServerFailed as error:
                    unavailable[config.name] = f"did not start: {error}"
                    sys.stderr.write(f"{config.name}: not available: did not start: {error}\n")
            for tls in settings.tls:
                for mode in ("full", "resumed"):
                    samples: dict[str, list[Sample]] = {r.config.name: [] for r in live}
                    for round_ in range(settings.rounds):
                        for server in live:
                            job = load.Job(server.ports, tls, mode == "resumed", settings.max_connections, settings.seconds, settings.workers)
                            label = f"{server.config.name} {key} TLS {tls} {mode} #{round_ + 1}"
                            samples[server.config.name].append(_measure(server, job, label))
                    for server in live:
                        rows.append(_throughput_row(server.config, key, tls, mode, samples[server.config.name]))
                        _say(rows[-1])
    return rows


@dataclass(frozen=True)
class Sample:
    """One run: what the client saw, the server's CPU seconds (all its processes, and the
    first one alone: the supervisor of a pool of workers), and what its workers counted."""

    outcome: load.Outcome
    cpu: float
    leader_cpu: float
    counted: dict[str, Any] | None


def _measure(server: servers.Running, job: load.Job, label: str) -> Sample:
    before, cpu, leader = server.stats(), server.cpu_seconds(), server.leader_cpu_seconds()
    outcome = load.run(job, label, show_progress=None if sys.stderr.isatty() else False)
    cpu, leader = server.cpu_seconds() - cpu, server.leader_cpu_seconds() - leader
    counted = pool.combined([pool.difference(b, a) for b, a in zip(before, server.stats())]) if before else None
    return Sample(outcome, cpu, leader, counted)


def _throughput_row(config: servers.Config, key: str, tls: str, mode: str, samples: list[Sample]) -> dict[str, Any]:
    best = max(samples, key=lambda sample: sample.outcome.rate)
    connections = max(best.outcome.connections, 1)
    row = {
        "config": config.name,
        "label": config.label,
        "key": key,
        "tls": tls,
        "mode": mode,
        **best.outcome.as_dict(),
        "server_cpu_ms": best.cpu * 1000 / connections,
        "client_cpu_ms": best.outcome.client_cpu_seconds * 1000 / connections,
        "samples": [round(sample.outcome.rate, 1) for sample in samples],
    }
    if best.counted is not None:
        row.update(pool=best.counted, leader_cpu_ms=best.leader_cpu * 1000 / connections)
    return row


def _say(row: dict[str, Any]) -> None:
    sys.stderr.write(
        f"  {row['config']:<26} {row['key']:<5} TLS {row['tls']} {row['mode']:<7} "
        f"{row['rate']:7.0f}/s  resumed {row['resumption_ratio']:4.0%}  errors {row['errors']}\n"
    )


def scaling(
    certificates: dict[str, tuple[Path, Path]],
    settings: Settings,
    workdir: Path,
    unavailable: dict[str, str],
) -> list[dict[str, Any]]:
    """One and two workers pinned to one CPU and to two (servers.SCALING), first key and TLS version only.

    The load clients are not pinned: they run wherever the kernel puts them.
    """
    narrow = Settings(**{**asdict(settings), "keys": settings.keys[:1], "tls": settings.tls[:1]})
    pinned = _available(list(servers.SCALING), unavailable)
    return throughput(pinned, certificates, narrow, workdir / "scaling", unavailable)


def hit_rates(
    configs: list[servers.Config],
    certificates: dict[str, tuple[Path, Path]],
    settings: Settings,
    workdir: Path,
    unavailable: dict[str, str],
) -> list[dict[str, Any]]:
    """Returning clients against one process and against fleets, for plain Twisted and each store.

    A configuration of workers (one port, N processes) runs once, as one
    server: its workers' own counts say how often another worker answered.
    """
    certificate, private_key = certificates[settings.keys[0]]
    rows = []
    for config in configs:
        if config.name not in (*HITRATE_CONFIGS, *WORKER_HITRATE_CONFIGS) or config.name in unavailable:
            continue
        for fleet in (1,) if config.stats else settings.fleets:
            if fleet < config.copies:
                continue
            for tls in settings.tls:
                try:
                    with servers.running(config, certificate, private_key, workdir / "hitrate", copies=fleet) as server:
                        rows.append(_returning_clients(server, fleet, tls, settings))
                except processes.ServerFailed as error:
                    unavailable.setdefault(config.name, f"did not start: {error}")
                    sys.stderr.write(f"{config.name} x{fleet}: not available: did not start: {error}\n")
    return rows


def _returning_clients(server: servers.Running, fleet: int, tls: str, settings: Settings) -> dict[str, Any]:
    config = server.config
    population = load.Population(server.ports, tls, settings.clients, settings.visits, settings.workers)
    before = server.stats()
    outcome = load.hit_rate(population, f"{config.name} x{fleet} TLS {tls} returning clients",
                            show_progress=None if sys.stderr.isatty() else False)  # fmt: skip
    counted = pool.combined([pool.difference(b, a) for b, a in zip(before, server.stats())]) if before else None
    sys.stderr.write(f"  {config.name:<26} x{fleet} TLS {tls} hit rate {outcome.ratio:6.1%} "
                     f"({outcome.resumed}/{outcome.offered}, errors {outcome.errors})"
                     + (f", from another worker {counted['cross_worker'] or 0:.0%}" if counted else "") + "\n")  # fmt: skip
    return {"config": config.name, "fleet": fleet, "tls": tls, "clients": settings.clients, "visits": settings.visits,
            **outcome.as_dict(), **({"pool": counted} if counted is not None else {})}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())

"""docs/benchmarks.md and the chart beside it, from the results of one run.

Everything is computed from the results dictionary that ``__main__`` builds
(and can dump as JSON), so the report can be rebuilt without measuring again
(``python -m bench --from-json results.json``).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from twisted_sesscache.sharing import STORE_EXPIRY_BUDGET

BASELINE = "twisted-sessions"  # bare Twisted CertificateOptions(enableSessions=True)
CEILING = "openssl-s_server"
# The plugin with a store in this process: OpenSSL's cache, or the memory store behind OpenSSL's callbacks.
MEMORY_STORES = ("sesscache-memory", "sesscache-memstore", "twistd-sesscache-memory", "twistd-sesscache-memstore")
REDIS_STORE = "twistd-sesscache-redis"  # the fleet: twistd processes sharing one Redis
REDIS_STORES = ("sesscache-redis", "sesscache-redis-tickets", REDIS_STORE)  # like for like first (the bench's own server), then twistd
LMDB_STORES = ("sesscache-lmdb", "twistd-sesscache-lmdb")
WORKER_CONFIGS = ("twistd-workers-1", "twistd-workers-2", "twistd-workers-auto")  # sharing one LMDB store
KIB = 1024
CREATION_RATE = 1000  # as in stall.py; kept here so that the report needs no OpenSSL


# -- the machine --------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the numbers were measured on; the load average tells how busy it was."""
    import twisted
    from twisted_sesscache import RUNTIME

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory": _meminfo_total(),
        "kernel": f"{platform.system()} {platform.release()}",
        "os": _os_release(),
        "python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "twisted": twisted.__version__,
        "pyopenssl": _version_of("OpenSSL"),
        "cryptography": _version_of("cryptography"),
        "server_openssl": f"{RUNTIME.version} ({RUNTIME.name})",
        "client_openssl": ssl.OPENSSL_VERSION,
        "nginx": _command_version(["nginx", "-v"]),
        "haproxy": _command_version(["haproxy", "-v"]),
        "openssl_cli": _command_version(["openssl", "version"]),
        "load_before": _loadavg(),
    }
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _os_release() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return "unknown"
    match = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', text, re.MULTILINE)
    return match.group(1) if match else "unknown"


def _version_of(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except Exception:  # any import problem: say so rather than fail the report
        return "not importable"


def _command_version(command: list[str]) -> str:
    if not shutil.which(command[0]):
        return "not installed"
    done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else "unknown"


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


# -- lookups --------------------------------------------------------------------------


def _row(results: dict[str, Any], config: str, key: str, tls: str, mode: str) -> dict[str, Any] | None:
    for row in results.get("throughput", []):
        if (row["config"], row["key"], row["tls"], row["mode"]) == (config, key, tls, mode):
            return row
    return None


def _rate(results: dict[str, Any], config: str, key: str, tls: str, mode: str) -> float | None:
    row = _row(results, config, key, tls, mode)
    return row["rate"] if row and row["connections"] else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _cells(results: dict[str, Any]) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    for row in results.get("throughput", []):
        cell = (row["key"], row["tls"])
        if cell not in seen:
            seen.append(cell)
    return seen


def _configs_measured(results: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for row in results.get("throughput", []):
        if row["config"] not in names:
            names.append(row["config"])
    return names


def _fmt(value: float | None, spec: str = ".0f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


KEY_NAMES = {"rsa": "RSA-2048", "ecdsa": "ECDSA P-256"}


# -- targets ------------------------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[dict[str, str]]:
    """The issue's targets: what was measured and whether it met them ("pass", "miss", "not measured")."""
    rows: list[dict[str, str]] = []
    unavailable = results.get("unavailable", {})
    measured = _configs_measured(results)

    def add(target: str, measured_text: str, verdict: str) -> None:
        rows.append({"target": target, "measured": measured_text, "verdict": verdict})

    def missing(name: str) -> str:
        return f"not available: {unavailable.get(name, 'not selected in this run')}"

    for names, threshold, label in (
        (MEMORY_STORES, 0.95, "memory"), (LMDB_STORES, 0.9, "LMDB"), (REDIS_STORES, 0.85, "Redis across processes"),
    ):
        target = f"resumed rate, {label} ≥ {threshold}× bare Twisted enableSessions=True"
        ran = [name for name in names if name in measured]
        if not ran:
            add(target, "; ".join(f"`{n}` {missing(n)}" for n in names), "not measured")
        for name in ran:
            ratios = {
                f"{KEY_NAMES.get(k, k)} TLS {t}": _ratio(_rate(results, name, k, t, "resumed"), _rate(results, BASELINE, k, t, "resumed"))
                for k, t in _cells(results)
            }
            known = {cell: r for cell, r in ratios.items() if r is not None}
            if not known:
                add(f"{target} (`{name}`)", f"`{BASELINE}` not measured", "not measured")
                continue
            lowest = min(known.values())
            text = ", ".join(f"{cell} {r:.2f}×" for cell, r in known.items())
            capacity = _ratio(_cpu(results, BASELINE, "rsa", "1.2", "resumed"), _cpu(results, name, "rsa", "1.2", "resumed"))
            if capacity is not None:
                text += f"; by server CPU per connection (RSA-2048 TLS 1.2) {capacity:.2f}×"
            from bench import report_instructions  # it builds on this module's helpers

            text += report_instructions.ratio_text(results, name)
            add(f"{target} (`{name}`)", text, "pass" if lowest >= threshold else "miss")

    for name in [n for n in (*MEMORY_STORES, REDIS_STORE) if n in measured]:
        full, resumed = _rate(results, name, "rsa", "1.2", "full"), _rate(results, name, "rsa", "1.2", "resumed")
        ratio = _ratio(resumed, full)
        target = f"resumed/full ≥ 4× for TLS 1.2 RSA-2048 (`{name}`)"
        if ratio is None:
            add(target, "TLS 1.2 RSA-2048 not measured", "not measured")
        else:
            by_cpu = _ratio(_cpu(results, name, "rsa", "1.2", "full"), _cpu(results, name, "rsa", "1.2", "resumed"))
            text = f"{resumed:.0f} / {full:.0f} = {ratio:.2f}×"
            if by_cpu is not None:
                text += f"; by server CPU per connection {by_cpu:.2f}×"
            add(target, text, "pass" if ratio >= 4 else "miss")

    hits = [r for r in results.get("hitrate", []) if r["offered"]]
    shared = [r for r in hits if r["fleet"] > 1 and r["config"] == REDIS_STORE]
    if shared:
        worst = min(shared, key=lambda r: r["ratio"])
        add("fleet hit rate ≥ 99 % for returning clients (Redis store)",
            f"{worst['ratio']:.1%} (lowest: fleet of {worst['fleet']}, TLS {worst['tls']})",
            "pass" if worst["ratio"] >= 0.99 else "miss")  # fmt: skip
    else:
        alone = [r for r in hits if r["fleet"] > 1 and r["config"] in MEMORY_STORES]
        context = ""
        if alone:
            first = [r for r in alone if (r["config"], r["tls"]) == (alone[0]["config"], alone[0]["tls"])]
            context = f"; `{alone[0]['config']}` without a shared store: " + ", ".join(
                f"{r['ratio']:.0%} with {r['fleet']} processes" for r in first
            )
        add("fleet hit rate ≥ 99 % for returning clients (needs the Redis store)", missing(REDIS_STORE) + context, "not measured")
    pooled = [r for r in hits if r.get("pool") and r["pool"]["workers"] > 1]
    if pooled:
        worst = min(pooled, key=lambda r: r["ratio"])
        cross = worst["pool"]["cross_worker"]
        add("hit rate ≥ 99 % for returning clients across workers (`--workers 2`, LMDB)",
            f"{worst['ratio']:.1%} (lowest: `{worst['config']}`, TLS {worst['tls']}; "
            f"{_fmt(cross * 100 if cross is not None else None, '.0f', '%')} answered by another worker)",
            "pass" if worst["ratio"] >= 0.99 else "miss")  # fmt: skip
    singles = [r for r in hits if r["fleet"] == 1 and r["config"] in MEMORY_STORES]
    if singles:
        worst = min(singles, key=lambda r: r["ratio"])
        add("… the same for one process", f"{worst['ratio']:.1%} (lowest, `{worst['config']}`)",
            "pass" if worst["ratio"] >= 0.99 else "miss")  # fmt: skip

    stalls = {s["sessions"]: s for s in results.get("stall", [])}
    big = stalls.get(100_000)
    target = "worst reactor stall from a scheduled flush of 100,000 sessions < 20 ms"
    if big and "scheduled" in big:
        scheduled, sliced = big["scheduled"]["worst_ms"], big["sliced"]["worst_ms"]
        removed = big["scheduled"]["removed"]
        if removed < big["sessions"]:  # a stall is only measured while the loop flushes them all
            add(target, f"{scheduled:.1f} ms, but the loop removed only {removed:,}", "miss")
        else:
            add(target, f"{scheduled:.1f} ms (SessionCache's sliced flush loop)", "pass" if scheduled < 20 else "miss")
        add("… the same slicing driven by hand (cross-check)", f"{sliced:.1f} ms", "pass" if sliced < 20 else "miss")
        store = big.get("store", {})
        if "worst_ms" in store:
            add("… the memory store's expire()", f"{store['worst_ms']:.1f} ms", "pass" if store["worst_ms"] < 20 else "miss")
    else:
        add(target, f"not available: {(big or {}).get('unavailable', '100,000 sessions not measured in this run')}", "not measured")

    sized = [s for s in stalls.values() if "rss_per_session" in s]
    if sized:
        biggest = max(sized, key=lambda s: s["sessions"])
        per = biggest["rss_per_session"]
        add("≤ 1 KiB per cached session, OpenSSL's cache (`sesscache-memory`)", f"{per:.0f} bytes ({biggest['sessions']:,} sessions, RSS delta)", "pass" if per <= KIB else "miss")
        store = biggest.get("store", {})
        if "rss_per_entry" in store:
            per = store["rss_per_entry"]
            add("≤ 1 KiB per cached session, memory store entry (`MemoryStore`)", f"{per:.0f} bytes", "pass" if per <= KIB else "miss")
    else:
        add("≤ 1 KiB per cached session (memory store)", "not available", "not measured")
    from bench.report_workers import bytes_per_record

    for store, name in (("redis", "Redis bytes per key"), ("lmdb", "LMDB bytes per record")):
        measured_bytes = bytes_per_record(results, store)
        if measured_bytes is None:
            add(f"≤ 1 KiB per cached session, {name}", "not measured in this run (`--parts bytes`)", "not measured")
        else:
            add(f"≤ 1 KiB per cached session, {name}",
                f"{measured_bytes['bytes_per_record']:.0f} bytes (TLS {measured_bytes['tls']}, "
                f"{measured_bytes['records']:,} records; payload {measured_bytes['payload_per_record']:.0f})",
                "pass" if measured_bytes["bytes_per_record"] <= KIB else "miss")  # fmt: skip
    return rows


# -- Markdown --------------------------------------------------------------------------------


def markdown(results: dict[str, Any], chart: str | None) -> str:
    """The whole report."""
    out: list[str] = []
    settings = results.get("settings", {})
    info = results.get("machine", {})
    mode = "quick" if settings.get("quick") else "full"
    out += [
        "# Benchmarks",
        "",
        f"Measured by `python -m bench{' --quick' if mode == 'quick' else ''}` "
        f"(`make bench{'-quick' if mode == 'quick' else ''}`) on {info.get('date', 'an unknown date')}, "
        f"{mode} mode, in {results.get('elapsed', 0):.0f} s. Everything runs on one machine over loopback: "
        "the numbers are for comparing the configurations with each other, not for capacity planning.",
        "",
    ]
    if chart:
        out += [f"![handshakes per second]({chart})", ""]
    out += _machine_section(info, results)
    out += _targets_section(results)
    out += _throughput_section(results, settings)
    out += _hitrate_section(results)
    from bench import report_workers  # it builds on this module's helpers

    out += report_workers.workers_section(results)
    out += report_workers.scaling_section(results)
    out += report_workers.bytes_section(results)
    out += _stall_section(results)
    from bench import report_instructions

    out += report_instructions.section(results)
    out += _notes_section(results)
    return "\n".join(out).rstrip() + "\n"


def _table(header: Iterable[str], rows: Iterable[Iterable[str]], align: str | None = None) -> list[str]:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(("---:" if (align and align[i] == "r") else "---") for i in range(len(header))) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _machine_section(info: dict[str, Any], results: dict[str, Any]) -> list[str]:
    rows = [
        ("CPUs (nproc)", str(info.get("nproc"))),
        ("CPU model", str(info.get("cpu"))),
        ("memory", str(info.get("memory"))),
        ("system", f"{info.get('os')}, {info.get('kernel')}"),
        ("Python", str(info.get("python"))),
        ("Twisted / pyOpenSSL / cryptography", f"{info.get('twisted')} / {info.get('pyopenssl')} / {info.get('cryptography')}"),
        ("OpenSSL, servers", str(info.get("server_openssl"))),
        ("OpenSSL, load generator", str(info.get("client_openssl"))),
        ("nginx", str(info.get("nginx"))),
        ("HAProxy", str(info.get("haproxy", "not recorded"))),
        ("openssl CLI", str(info.get("openssl_cli"))),
        ("load average before / after", f"{info.get('load_before')} / {info.get('load_after', '?')}"),
    ]
    return ["## Machine", "", *_table(("what", "value"), rows)]


def _targets_section(results: dict[str, Any]) -> list[str]:
    marks = {"pass": "✅ pass", "miss": "❌ miss", "not measured": "– not measured"}
    rows = [(t["target"], t["measured"], marks[t["verdict"]]) for t in targets(results)]
    return ["## Targets (issues 5 and 11)", "", *_table(("target", "measured", "verdict"), rows)]


def _throughput_section(results: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    out = [
        "## Handshakes per second",
        "",
        f"Connections per wall-clock second, best of {settings.get('rounds', 1)} interleaved runs of at most "
        f"{settings.get('seconds', 0):g} s / {settings.get('max_connections', 0):,} connections each, "
        f"{settings.get('workers', 1)} client processes. *Full*: no session offered. *Resumed*: each client "
        "offers the session of its previous connection; *resumption* is the share of those connections "
        "that the server actually resumed. Each connection sends `GET /ok HTTP/1.0`, reads the small answer "
        "to the end and closes with close_notify. *× Twisted* and *× s_server* compare the resumed rate with "
        f"`{BASELINE}` and `{CEILING}`. *Server CPU* is the user+system time of the server's processes per "
        "connection, which is less sensitive to a busy machine than the rate.",
        "",
    ]
    labels = {row["config"]: row["label"] for row in results.get("throughput", [])}
    for key, tls in _cells(results):
        rows = []
        for name in _configs_measured(results):
            full = _row(results, name, key, tls, "full")
            resumed = _row(results, name, key, tls, "resumed")
            if not full and not resumed:
                continue
            full_rate = full["rate"] if full else None
            resumed_rate = resumed["rate"] if resumed else None
            rows.append((
                f"`{name}` {labels.get(name, '')}",
                _fmt(full_rate),
                _fmt(resumed_rate),
                _fmt(_ratio(resumed_rate, full_rate), ".2f", "×"),
                _fmt(resumed["resumption_ratio"] if resumed else None, ".0%"),
                _fmt(_ratio(resumed_rate, _rate(results, BASELINE, key, tls, "resumed")), ".2f", "×"),
                _fmt(_ratio(resumed_rate, _rate(results, CEILING, key, tls, "resumed")), ".2f", "×"),
                f"{_fmt(full['server_cpu_ms'] if full else None, '.2f')} / "
                f"{_fmt(resumed['server_cpu_ms'] if resumed else None, '.2f')}",
                _errors(full, resumed),
            ))
        out += [f"### {KEY_NAMES.get(key, key)}, TLS {tls}", ""]
        out += _table(
            ("server", "full/s", "resumed/s", "resumed/full", "resumption", "× Twisted", "× s_server", "server CPU ms full / resumed", "errors"),
            rows,
            "lrrrrrrrr",
        )
    unavailable = results.get("unavailable", {})
    if unavailable:
        out += ["Configurations not measured:", ""]
        out += [f"- `{name}`: not available: {why}" for name, why in unavailable.items()]
        out += [""]
    return out


def _errors(*rows: dict[str, Any] | None) -> str:
    errors = sum(r["errors"] for r in rows if r)
    first = next((r["first_error"] for r in rows if r and r["first_error"]), "")
    return f"{errors} ({first[:60]})" if errors else "0"


def _hitrate_section(results: dict[str, Any]) -> list[str]:
    rows = results.get("hitrate", [])
    if not rows:
        return []
    first = rows[0]
    out = [
        "## Returning clients: resumption hit rate",
        "",
        f"{first['clients']} clients, each connecting {first['visits']} times and offering the session of its "
        "previous visit; every visit goes to one of the fleet's processes chosen at random (a load balancer "
        "without affinity). Hit rate = resumed visits / visits that offered a session. Without a shared "
        "store a session only resumes on the process that made it, so a fleet of N resumes about 1/N of "
        "the time, for plain Twisted and for the memory store alike; sharing sessions across processes "
        "is the Redis store's job.",
        "",
    ]
    shared = (REDIS_STORE, *WORKER_CONFIGS)  # a session resumes on any of their processes
    table = [
        (f"`{r['config']}`", str(r["fleet"]) if "pool" not in r else f"1 ({r['pool']['workers']} workers)", r["tls"],
         f"{r['resumed']} / {r['offered']}", f"{r['ratio']:.1%}",
         f"{1 / r['fleet']:.0%}" if r["config"] not in shared else "100%",
         _fmt(r["pool"]["cross_worker"] * 100 if r.get("pool") and r["pool"]["cross_worker"] is not None else None, ".0f", "%"),
         str(r["errors"]))
        for r in rows
    ]  # fmt: skip
    out += _table(("server", "processes", "TLS", "resumed / offered", "hit rate", "expected", "from another worker", "errors"),
                  table, "lrlrrrrr")  # fmt: skip
    if any("pool" in r for r in rows):
        out += ["*From another worker*: for `twistd sesscache --workers N`, the share of resumptions a worker "
                "answered from the LMDB store, not from its own OpenSSL cache (see the workers section).", ""]
    return out


def _stall_section(results: dict[str, Any]) -> list[str]:
    stalls = results.get("stall", [])
    if not stalls:
        return []
    out = [
        "## Flush stalls and memory per session",
        "",
        "In a subprocess with its own reactor, the cache of one context is filled with copies of a real "
        "TLS 1.2 server session (distinct session IDs), all expired, and a 1 ms `LoopingCall` runs "
        "throughout. *Worst lateness* is how late that timer fired at worst while the flush ran; "
        "*baseline* is the same before the flush (the machine's own noise); *flush* is the duration of "
        "the longest single flush call (for *auto*, the flushing handshake minus a median handshake). "
        "Each scenario ran in several fresh processes; the least-disturbed run is shown.",
        "",
        "- *scheduled*: `SessionCache(flush_interval=0.3)`'s own loop, which flushes one second of "
        "expiry per reactor turn (OpenSSL 3 keeps the cache sorted by expiry, so each step only "
        f"touches that second); sessions created at {CREATION_RATE:,}/s, the loop catching up from "
        "before the first of them expired, as one running all along would have.",
        "- *sliced*: the same slicing driven by hand, step by step, as a cross-check.",
        "- *auto*: OpenSSL's automatic flush, which runs inside every 255th handshake (mode `server` "
        "without `no-auto-clear`).",
        "- *store*: `MemoryStore.expire()` over as many sealed records, all expired (the memory "
        "store behind OpenSSL's external-cache callbacks).",
        "",
    ]
    rows, memory = [], []
    for stall in stalls:
        if "unavailable" in stall:
            rows.append((f"{stall['sessions']:,}", "all", f"not available: {stall['unavailable']}", "", "", ""))
            continue
        for scenario in ("scheduled", "sliced", "auto"):
            s = stall[scenario]
            if scenario == "sliced":
                detail = f"{s['steps']} steps in {s['total_s']:.2f} s, removed {s['removed']:,}"
            elif scenario == "auto":
                detail = f"after {s['handshakes']} handshakes, {s['left']:,} left"
            else:
                detail = f"removed {s['removed']:,}"
            rows.append((f"{stall['sessions']:,}", scenario, f"{s['worst_ms']:.1f} ms", f"{s['baseline_ms']:.1f} ms",
                         f"{s['flush_ms']:.1f} ms", detail))
        store = stall.get("store", {})
        if "worst_ms" in store:
            rows.append((f"{stall['sessions']:,}", "store", f"{store['worst_ms']:.1f} ms", f"{store['baseline_ms']:.1f} ms",
                         f"{store['flush_ms']:.1f} ms", f"removed {store['removed']:,}"))  # fmt: skip
        elif store:
            rows.append((f"{stall['sessions']:,}", "store", f"not available: {store.get('unavailable')}", "", "", ""))
        memory.append((
            f"{stall['sessions']:,}",
            f"{stall['rss_per_session']:.0f}",
            str(stall["der_bytes"]),
            _fmt(store.get("rss_per_entry")),
            _fmt(store.get("record_bytes")),
        ))
    out += _table(("sessions", "scenario", "worst lateness", "baseline", "flush", ""), rows, "llrrrl")
    if memory:
        out += [
            "Memory per cached session: RSS growth of the process while the sessions were added, divided "
            "by their number, for OpenSSL's internal cache (`SessionCache()`) and for the memory store's "
            "entries (`SessionCache(store=MemoryStore())` keeps both: OpenSSL still caches internally). "
            "*DER* is the serialised session; *record* the sealed record the store keeps.",
            "",
        ]
        out += _table(("sessions", "OpenSSL cache, bytes / session", "DER bytes", "memory store, bytes / entry", "record bytes"), memory, "rrrrr")
    return out


NOTES = """\
## Reading these numbers

- **One client for every server.** The load generator is Python's `ssl` module (the system
  OpenSSL) in a few processes. On a small machine it shares the CPUs with the server under test and
  costs about as much per connection as the faster servers do (client CPU per connection below), so
  `openssl s_server` and nginx are held back by the client, and resumed/full ratios of rates are
  compressed for every server alike. *Server CPU per connection* does not depend on the client.
- **A shared machine.** Other work on the machine slows some runs; the rounds of each measurement
  are interleaved across servers and the best run counts, and the load average above says how busy
  the machine was. Compare servers within one table, not across runs.
- **TLS 1.3 resumption still does an ECDHE exchange** (psk_dhe_ke, the mode OpenSSL clients offer)
  and the server issues a new ticket on each resumption, so resumed TLS 1.3 gains less over full
  than TLS 1.2 does.
- **Tickets are off everywhere** (Twisted's default, `ssl_session_tickets off`, `s_server -no_ticket`),
  so TLS 1.3 uses stateful tickets kept in each server's session cache, like TLS 1.2 session IDs.
- **Same small answer everywhere** (`ok`, HTTP/1.0), except `twistd sesscache`: without an upstream
  it answers through twisted.web (its status-page resource, for which `/ok` is a small 404) and
  writes an access-log line per request. Its rows include that web and logging work, which is
  Twisted's; `sesscache-memory` is the like-for-like comparison with bare Twisted.
- **nginx runs one worker** so that it uses one core like the one-process servers; `nginx-2`
  (two workers, one `ssl_session_cache shared:` zone) and `haproxy` (`nbthread 2`, its own
  session cache, answering `http-request return status 200` itself, like nginx's `return 200`)
  are the anchors for `twistd sesscache --workers 2`.
"""


def _cpu(results: dict[str, Any], config: str, key: str, tls: str, mode: str) -> float | None:
    row = _row(results, config, key, tls, mode)
    return row["server_cpu_ms"] if row and row["connections"] else None


def _notes_section(results: dict[str, Any]) -> list[str]:
    out = [NOTES]
    client = [
        (f"`{r['config']}`", KEY_NAMES.get(r["key"], r["key"]), r["tls"], r["mode"], f"{r['client_cpu_ms']:.2f}")
        for r in results.get("throughput", [])
        if r["config"] == CEILING and r["connections"]
    ]
    if client:
        out += ["Client CPU per connection against the ceiling (ms, summed over client processes):", ""]
        out += _table(("server", "key", "TLS", "mode", "client CPU ms"), client, "lllrr")
    out += _profile_section(results)
    out += _ours_section(results)
    return out


def _profile_section(results: dict[str, Any]) -> list[str]:
    profile = results.get("profile")
    if not profile:
        return []
    if isinstance(profile, dict):
        return ["## Where the time goes", "", f"Not profiled: {profile.get('unavailable')}.", ""]
    base = {row["tls"]: row["cpu_ms"] for row in profile if row["config"] == BASELINE}
    rows = []
    for row in profile:
        owners = row["owners"]
        delta = row["cpu_ms"] - base[row["tls"]] if row["tls"] in base else None
        rows.append((
            f"`{row['config']}`",
            row["tls"],
            f"{row['cpu_ms']:.3f}",
            "–" if delta is None or row["config"] == BASELINE else f"{delta:+.3f} ({delta / base[row['tls']]:+.0%})",
            *(f"{owners.get(who, 0):.0%}" for who in ("twisted-sesscache", "pyOpenSSL + OpenSSL", "Twisted", "other")),
            ", ".join(f"`{function}` {share:.1%}" for function, share in row["ours"][:4]) or "–",
        ))
    return [
        "## Where the time goes",
        "",
        "Resumed handshakes, RSA-2048, against one server at a time, sampled by py-spy "
        "(`bench/profiling.py` says how samples are charged). *CPU ms/conn* is the "
        "server's user+system time per connection; its difference from bare Twisted is what "
        "twisted-sesscache costs. The sample shares are of busy wall time (system calls and waiting "
        "for a CPU included), so they rank costs rather than measure them.",
        "",
        *_table(
            ("server", "TLS", "CPU ms/conn", "vs bare Twisted", "ours", "pyOpenSSL + OpenSSL", "Twisted", "other", "our top functions (self)"),
            rows,
            "llrrrrrrl",
        ),
    ]


def _ours_section(results: dict[str, Any]) -> list[str]:
    """What the misses are made of: ours (to fix) or not ours (and why)."""
    def ms(value: float | None, spec: str = ".2f") -> str:
        return "?" if value is None else f"{value:{spec}}"

    bare_full, bare_resumed = _cpu(results, BASELINE, "rsa", "1.2", "full"), _cpu(results, BASELINE, "rsa", "1.2", "resumed")
    ceiling = [(n, _cpu(results, n, "rsa", "1.2", "full"), _cpu(results, n, "rsa", "1.2", "resumed")) for n in ("nginx", CEILING)]
    others = ", ".join(f"{n} {_ratio(f, r):.1f}×" for n, f, r in ceiling if _ratio(f, r))
    stalls = {s["sessions"]: s for s in results.get("stall", []) if "scheduled" in s}
    big = stalls.get(max(stalls)) if stalls else None
    per_session_us = big["auto"]["flush_ms"] * 1000 / big["sessions"] if big else None
    store = (big or {}).get("store", {})
    lines = [
        "## Misses: what is ours and what is not",
        "",
        "- **Resumed rate against bare Twisted.** Ours. The plugin's per-connection work (the "
        "`WatchedConnection` wrapper, the handshake observer, and parsing every ClientHello even "
        "without a store) adds server CPU to each connection (table above). With the memory store, "
        "every offered session is also fetched from the store, unsealed (AES-GCM) and decoded before "
        "OpenSSL looks, although OpenSSL's own cache still holds it, and in TLS 1.3 each resumption's "
        "new ticket is sealed and stored. Fixes: parse the ClientHello only when a store is wired; "
        "skip the store lookup for session IDs this process's cache already holds (the new/remove "
        "callbacks can keep that set); or run the store with `no-internal-store` so it is the only copy.",
        f"- **resumed/full ≥ 4× (TLS 1.2, RSA-2048).** Not ours. By server CPU, bare Twisted does "
        f"{ms(bare_full)} ms per full and {ms(bare_resumed)} ms per resumed connection "
        f"({ms(_ratio(bare_full, bare_resumed), '.1f')}×; {others}). A resumed handshake saves "
        "the RSA signature and the key exchange, but not Twisted's fixed cost per connection (accept, "
        "transport and protocol objects, the memory-BIO TLS layer, the system calls of each connection), which is "
        "most of what is left; the plugin can at best match bare Twisted's ratio. The rate ratio is "
        "lower still because the client is as busy as the server.",
        f"- **Flush stall.** OpenSSL's `SSL_CTX_flush_sessions` costs about {ms(per_session_us, '.2f')} µs "
        "per expired session (freeing each one under the cache lock, in C), so one call that removes "
        "100,000 sessions holds the reactor for tens of milliseconds. That cost is not ours; calling "
        "it for everything at once would be. OpenSSL 3 keeps the cache in expiry order, so "
        "`SessionCache`'s flush loop advances one second of expiry per reactor turn and touches only "
        "the sessions made in that second. OpenSSL's automatic flush runs inside every 255th handshake "
        "and cannot be sliced (the *auto* rows above); a nonzero `flush_interval`, the default under the "
        "shared runtime, sets `no-auto-clear` and so removes it.",
        f"- **Memory store expiry.** `MemoryStore.expire()` keeps expiries in a heap and the flush "
        f"loop drops at most {STORE_EXPIRY_BUDGET:,} per reactor turn: the longest turn took "
        f"{ms(store.get('flush_ms'), '.1f')} ms with {big['sessions'] if big else 0:,} expired entries.",
        "- **Memory per session.** OpenSSL's `SSL_SESSION` and its cache bookkeeping are about 1 KiB "
        "(not ours: the structure with its secret buffers, a lock per session, the hash-table entry, "
        "and malloc's overhead on each). A "
        "memory-store entry (sealed record, key, and dict entry) is about half that and ours; with the "
        "memory store wired, a session is kept twice (OpenSSL's cache and the store).",
        "",
    ]
    return lines


# -- the chart ---------------------------------------------------------------------------------


def chart(results: dict[str, Any], path: Path) -> str | None:
    """A PNG of full and resumed rates per configuration; None (and a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.stderr.write(
            "chart skipped: matplotlib is not installed (pip install matplotlib, or the project's 'bench' extra)\n"
        )
        return None
    cells = _cells(results)
    names = _configs_measured(results)
    if not cells or not names:
        return None
    columns = min(2, len(cells))
    rows = (len(cells) + columns - 1) // columns
    width_each = max(6.5, 0.45 * len(names))  # room for every configuration's label
    figure, axes = plt.subplots(rows, columns, figsize=(width_each * columns, 3.8 * rows), squeeze=False)
    width = 0.38
    for index, (key, tls) in enumerate(cells):
        axis = axes[index // columns][index % columns]
        positions = range(len(names))
        for offset, mode, color in ((-width / 2, "full", "#9aa9bd"), (width / 2, "resumed", "#2f6db5")):
            values = [_rate(results, name, key, tls, mode) or 0 for name in names]
            axis.bar([p + offset for p in positions], values, width, label=mode, color=color)
        axis.set_title(f"{KEY_NAMES.get(key, key)}, TLS {tls}")
        axis.set_xticks(list(positions))
        axis.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        axis.set_ylabel("connections / s")
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize=8)
    for extra in range(len(cells), rows * columns):
        axes[extra // columns][extra % columns].axis("off")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path.name


def write(results: dict[str, Any], output: Path, with_chart: bool = True) -> Path:
    """Write the Markdown report (and its PNG beside it); return the report's path."""
    output.parent.mkdir(parents=True, exist_ok=True)
    picture = chart(results, output.with_suffix(".png")) if with_chart else None
    output.write_text(markdown(results, picture))
    return output

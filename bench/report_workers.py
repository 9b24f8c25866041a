"""The report's sections on workers: one port served by N processes, how it scales, what a session costs a store.

From the same results dictionary as the rest of the report (report.py calls
these); every figure is a ratio or a count of one run, and what is expected on
bigger machines is computed from those figures and labelled as expectation.
"""

from __future__ import annotations

from typing import Any

from bench import report

ONE, TWO = "twistd-workers-1", "twistd-workers-2"
WORKERS = (ONE, TWO, "twistd-workers-auto")
# Servers with several processes or threads sharing one session cache, and their one-process forms.
ANCHORS = ("twistd-sesscache-memory", "nginx", "nginx-2", "haproxy")
EXPECTED_CORES = 16


def _share(value: float | None) -> str:
    return report._fmt(None if value is None else value * 100, ".0f", "%")


def _get(row: dict[str, Any] | None, key: str) -> float | None:
    return None if row is None else row.get(key)


def _split(pool: dict[str, Any] | None) -> str:
    """How the kernel spread the connections over the workers, e.g. ``49/51``."""
    if not pool or not pool.get("accept"):
        return "–"
    return "/".join(f"{w['accept'] * 100 / pool['accept']:.0f}" for w in pool["per_worker"])


def workers_section(results: dict[str, Any]) -> list[str]:
    """Workers beside the multi-process anchors, per key type and TLS version."""
    names = [n for n in report._configs_measured(results) if n in WORKERS or n in ANCHORS]
    if not any(n in WORKERS for n in names):
        return []
    out = [
        "## Workers: one port, N processes, one LMDB store",
        "",
        "`twistd sesscache --workers N`: the parent opens the port once and N worker processes accept on it; "
        "sessions move between workers through the LMDB store (`--workers 1` is given `--store lmdb` too, so "
        "that the ratio measures the workers, not the store). Same runs as the tables above (two load "
        "client processes). *Split* is the share of connections each worker accepted in the best resumed "
        "run; *from another worker* is the share of resumptions a worker answered from the store because "
        "its own OpenSSL cache did not have the session (OpenSSL's `cb_hits` / `hits`, summed over the "
        "workers from `/stats.json`'s `per_worker`; bench/pool.py says why that is exact under TLS 1.3 "
        "and a lower bound under TLS 1.2, where a session keeps its ID and moves once). *Supervisor CPU* is "
        "the parent's own time per connection (it relays every worker's log lines). nginx, HAProxy and "
        "one-process `twistd sesscache` are the anchors.",
        "",
    ]
    for key, tls in report._cells(results):
        rows = []
        for name in names:
            full, resumed = (report._row(results, name, key, tls, mode) for mode in ("full", "resumed"))
            if not full and not resumed:
                continue
            pool = (resumed or {}).get("pool")
            rows.append((
                f"`{name}`",
                report._fmt(_get(full, "rate")),
                report._fmt(_get(resumed, "rate")),
                f"{report._fmt(_get(full, 'server_cpu_ms'), '.2f')} / {report._fmt(_get(resumed, 'server_cpu_ms'), '.2f')}",
                report._fmt((resumed or {}).get("leader_cpu_ms") if pool and pool["workers"] > 1 else None, ".2f"),
                _split(pool),
                _share(pool["cross_worker"]) if pool else "–",
                report._errors(full, resumed),
            ))  # fmt: skip
        out += [f"### {report.KEY_NAMES.get(key, key)}, TLS {tls}", ""]
        out += report._table(("server", "full/s", "resumed/s", "server CPU ms full / resumed", "supervisor CPU ms",
                              "split %", "from another worker", "errors"), rows, "lrrrrrrr")  # fmt: skip
    out += ratio_lines(results, ONE, TWO)
    return out


def ratio_lines(results: dict[str, Any], one: str, two: str, rows_key: str = "throughput") -> list[str]:
    """Two workers over one: rates, and connections per server CPU second, for every cell measured."""
    view = {"throughput": results.get(rows_key, [])}
    lines = []
    for key, tls in report._cells(view):
        parts = []
        for mode in ("full", "resumed"):
            rate = report._ratio(report._rate(view, two, key, tls, mode), report._rate(view, one, key, tls, mode))
            cpu = report._ratio(report._cpu(view, one, key, tls, mode), report._cpu(view, two, key, tls, mode))
            if rate is not None:
                parts.append(f"{mode} {rate:.2f}×" + (f" (per server CPU second {cpu:.2f}×)" if cpu else ""))
        if parts:
            lines.append(f"- {report.KEY_NAMES.get(key, key)}, TLS {tls}: " + ", ".join(parts))
    if not lines:
        return []
    return [f"Two workers over one (`{two}` / `{one}`):", "", *lines, ""]


def cross_worker_rate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The returning-clients runs of configurations with workers: overall hit rate and the cross-worker share."""
    return [r for r in results.get("hitrate", []) if r.get("pool") and r["pool"]["workers"] > 1]


def _pinned(results: dict[str, Any], name: str, cpus: str, mode: str) -> dict[str, Any] | None:
    for row in results.get("scaling", []):
        if (row["config"], row["mode"]) == (f"{name}@cpu{cpus}", mode) and row["connections"]:
            return row
    return None


def scaling_section(results: dict[str, Any]) -> list[str]:
    """One and two workers on one CPU and on two (taskset), and what 16 cores would give."""
    rows = results.get("scaling", [])
    if not rows:
        return []
    first = rows[0]
    cpu_sets = list(dict.fromkeys(row["config"].split("@cpu", 1)[1] for row in rows))
    table = []
    for cpus in cpu_sets:
        cells = [report._fmt((_pinned(results, n, cpus, m) or {}).get("rate")) for n in (ONE, TWO) for m in ("full", "resumed")]
        ratios = [report._fmt(report._ratio((_pinned(results, TWO, cpus, m) or {}).get("rate"),
                                            (_pinned(results, ONE, cpus, m) or {}).get("rate")), ".2f", "×")
                  for m in ("full", "resumed")]  # fmt: skip
        cpu = [report._fmt((_pinned(results, n, cpus, "resumed") or {}).get("server_cpu_ms"), ".2f") for n in (ONE, TWO)]
        table.append((f"`taskset -c {cpus}`", *cells, *ratios, " / ".join(cpu)))
    out = [
        "## How it scales with cores",
        "",
        f"`{ONE}` and `{TWO}` with the server's processes pinned by `taskset -c` (the supervisor and its "
        "workers inherit the mask), "
        f"{report.KEY_NAMES.get(first['key'], first['key'])}, TLS {first['tls']}, interleaved as above. "
        "The two load client processes are **not** pinned: the kernel runs them on either CPU. With the "
        "server on CPU 0 they mostly take CPU 1, so one worker has a core of its own; with the server on "
        "both CPUs, server and clients share them. A second worker can only help when it has a core that "
        "the first one and the clients leave idle, which a 2-CPU machine driving its own load barely has. "
        "(`--workers auto` counts the machine's CPUs, not the taskset mask: under `taskset -c 0` it "
        "still starts two.)",
        "",
        *report._table(("server CPUs", "1 worker full/s", "1 worker resumed/s", "2 workers full/s", "2 workers resumed/s",
                        "2/1 full", "2/1 resumed", "server CPU ms per resumed, 1 / 2"), table, "lrrrrrrr"),  # fmt: skip
    ]
    return out + expectation(results)


def expectation(results: dict[str, Any]) -> list[str]:
    """What 16 cores should give, computed from this run's per-connection costs; an expectation, not a measurement."""
    key, tls = next(iter(report._cells(results)), ("rsa", "1.2"))
    two = {mode: report._row(results, TWO, key, tls, mode) for mode in ("full", "resumed")}
    if not all(row and row["connections"] and "leader_cpu_ms" in row for row in two.values()):
        # No unpinned run of two workers: the pinned one with the most CPUs.
        widest = max((r["config"].split("@cpu", 1)[1] for r in results.get("scaling", [])), key=len, default="")
        two = {mode: _pinned(results, TWO, widest, mode) for mode in ("full", "resumed")}
    if not all(row and "leader_cpu_ms" in row for row in two.values()):
        return []
    write_us = ((results.get("lmdb_cost") or {}).get("set (at the bound: evicts the oldest)"))
    lines = [
        f"**Expected on {EXPECTED_CORES} cores (reasoned from this run's costs, not measured).** With the load "
        "generated on other machines, two workers should give close to 2× one worker, not the ratio above, "
        "where the load clients take about one of the two CPUs. Per-connection CPU on this busy 2-CPU machine "
        "is, if anything, higher than on an idle one.",
        "",
    ]
    for mode, row in two.items():
        assert row is not None
        worker_ms = max(row["server_cpu_ms"] - row["leader_cpu_ms"], 1e-3)
        per_core = 1000 / worker_ms
        ceiling = 1000 / row["leader_cpu_ms"] if row["leader_cpu_ms"] > 0 else None
        text = (f"- {mode}: a worker spends {worker_ms:.2f} ms of CPU per connection, so {EXPECTED_CORES} workers "
                f"with the load generated elsewhere could do about {EXPECTED_CORES * per_core:,.0f}/s "
                f"({per_core:,.0f}/s per core)")  # fmt: skip
        expected = EXPECTED_CORES * per_core
        if ceiling:
            text += (f"; but the supervisor relays each worker's log lines at {row['leader_cpu_ms']:.3f} ms per "
                     f"connection on one core, which caps the whole pool near {ceiling:,.0f}/s")  # fmt: skip
            expected = min(expected, ceiling)
        lines.append(text + f": expect about {expected:,.0f}/s, {expected / per_core:.1f}× one worker's core.")
    lines += [
        f"- Sessions: with {EXPECTED_CORES} workers, about {1 - 1 / EXPECTED_CORES:.0%} of resumptions land on a "
        "worker that did not make the session (TLS 1.3) and are served from LMDB (a read transaction, "
        "lock-free), so the resumed cost per connection rises towards that of the store path.",
        "- Writes: LMDB has one writer at a time; every new session is a write"
        + (f" of about {write_us:.0f} µs here, so the store alone allows some {1e6 / write_us:,.0f} new sessions/s"
           if write_us else "") + ", far above what 16 cores of full handshakes make.",
        "- The shared listening socket wakes the workers in turn; at 16 the split stays even but each "
        "accept wakes more sleepers. Expect near-linear scaling up to the supervisor's ceiling, which is "
        "the first thing to lift (a worker could write its own log).",
        "",
    ]
    return lines


def bytes_section(results: dict[str, Any]) -> list[str]:
    rows = results.get("bytes", [])
    if not rows:
        return []
    table = []
    for row in rows:
        if "unavailable" in row:
            table.append((row["store"], row.get("tls", "all"), f"not available: {row['unavailable']}", "", "", ""))
            continue
        table.append((row["store"], row["tls"], f"{row['connections']:,}", f"{row['records']:,}",
                      report._fmt(row["bytes_per_record"]), report._fmt(row["payload_per_record"])))  # fmt: skip
    out = [
        "## Bytes per session in the shared stores",
        "",
        f"`{'twistd sesscache'}` with the store was sent full handshakes (one session each under TLS 1.2; "
        "under TLS 1.3 one per ticket the server issues), then the store was measured from outside "
        "(bench/store_bytes.py): for LMDB the pages its databases use (records and the expiry index; the "
        "file is a sparse map sized for the bound), for Redis the growth of `INFO memory`'s `used_memory` "
        "over the growth of `DBSIZE`. *Payload* is the key and the sealed value each record carries.",
        "",
        *report._table(("store", "TLS", "handshakes", "records added", "bytes per record", "payload bytes"), table, "llrrrr"),
    ]
    cost = results.get("lmdb_cost")
    if cost:
        out += ["LMDB store, CPU µs per call (bench/lmdb_cost.py, 20,480 records): "
                + ", ".join(f"{name} {value:.1f}" for name, value in cost.items()) + ".", ""]
    return out


def bytes_per_record(results: dict[str, Any], store: str) -> dict[str, Any] | None:
    """The largest figure for ``store`` (over TLS versions), for the targets table."""
    known = [r for r in results.get("bytes", []) if r["store"] == store and r.get("bytes_per_record")]
    return max(known, key=lambda r: r["bytes_per_record"]) if known else None

"""The bench: its quick mode on a subset, judged only on ratios measured in the same run.

Absolute rates depend on the machine and on whatever else runs on it; ratios
between servers measured side by side, interleaved, do not (much).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import instructions, pool, processes, profiling, report, report_instructions, report_workers, servers
from bench.__main__ import _available

SUBSET = ("twisted-default", "twisted-sessions", "sesscache-memory", "openssl-s_server")


def run_quick(directory: Path, configs: tuple[str, ...], rounds: int = 3) -> dict[str, Any]:
    """The quick bench, TLS 1.2 RSA only, throughput only; its JSON results and report."""
    directory.mkdir(parents=True, exist_ok=True)
    results = directory / "results.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "bench", "--quick",
            "--only", ",".join(configs), "--parts", "throughput", "--keys", "rsa", "--tls", "1.2",
            "--rounds", str(rounds), "--json", str(results), "--output", str(directory / "benchmarks.md"),
            "--no-chart",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=servers.child_environment(),
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    loaded: dict[str, Any] = json.loads(results.read_text())
    loaded["report"] = (directory / "benchmarks.md").read_text()
    return loaded


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def quick_results(bench_dir: Path) -> dict[str, Any]:
    return run_quick(bench_dir / "subset", SUBSET)


def _row(results: dict[str, Any], config: str, mode: str) -> dict[str, Any]:
    for row in results["throughput"]:
        if (row["config"], row["key"], row["tls"], row["mode"]) == (config, "rsa", "1.2", mode):
            return row
    pytest.fail(f"{config} {mode} was not measured; not available: {results['unavailable'].get(config)}")


@pytest.mark.slow
def test_no_connection_failed(quick_results: dict[str, Any]) -> None:
    for row in quick_results["throughput"]:
        assert row["connections"] > 0, row
        assert row["errors"] == 0, row


@pytest.mark.slow
def test_sesscache_resumes_and_default_twisted_never_does(quick_results: dict[str, Any]) -> None:
    assert _row(quick_results, "sesscache-memory", "resumed")["resumption_ratio"] >= 0.95
    assert _row(quick_results, "twisted-sessions", "resumed")["resumption_ratio"] >= 0.95
    assert _row(quick_results, "twisted-default", "resumed")["resumption_ratio"] == 0


@pytest.mark.slow
def test_report_judges_the_ratios_it_measured(quick_results: dict[str, Any]) -> None:
    """Speed is judged in the report, from ratios of one run, not by this suite.

    A shared CI machine puts resumed/full anywhere from 1.9x to 3x and ours/bare
    from 0.7x to 1.1x; a threshold here would flake, so the suite checks that the
    ratios were measured and given a verdict, and docs/benchmarks.md records them.
    """
    verdicts = {t["target"]: t for t in report.targets(quick_results)}
    for target in (
        "resumed rate, memory ≥ 0.95× bare Twisted enableSessions=True (`sesscache-memory`)",
        "resumed/full ≥ 4× for TLS 1.2 RSA-2048 (`sesscache-memory`)",
    ):
        assert verdicts[target]["verdict"] in ("pass", "miss"), verdicts[target]
        assert any(ch.isdigit() for ch in verdicts[target]["measured"]), verdicts[target]
    assert "## Targets" in quick_results["report"], quick_results["report"][:2000]


@pytest.mark.slow
def test_report_has_the_table_and_the_machine(quick_results: dict[str, Any]) -> None:
    text = quick_results["report"]
    assert "## Machine" in text and "OpenSSL, servers" in text
    assert "### RSA-2048, TLS 1.2" in text
    for name in SUBSET:
        if name not in quick_results["unavailable"]:
            assert f"`{name}`" in text


# -- without servers ---------------------------------------------------------------------


def test_missing_pieces_are_reported_not_raised() -> None:
    absent = servers.Config(
        "nowhere",
        "a configuration whose pieces are missing",
        servers.template("no-such-server", "{port}"),
        needs=(servers.executable("no-such-server-binary"), servers.importable("no_such_module.tap")),
    )
    unavailable: dict[str, str] = {}
    assert _available([absent], unavailable) == []
    assert "no-such-server-binary" in unavailable["nowhere"]
    text = report.markdown({"throughput": [], "unavailable": unavailable}, None)
    assert "`nowhere`: not available: " in text


def test_a_server_that_does_not_start_is_stopped_and_explained(tmp_path: Path) -> None:
    broken = servers.Config("broken", "exits at once", servers.template(sys.executable, "-c", "raise SystemExit('no')"))
    with pytest.raises(processes.ServerFailed, match="exited with 1"):
        with servers.running(broken, tmp_path / "c", tmp_path / "k", tmp_path):
            pass


def test_targets_are_judged_from_ratios() -> None:
    def row(config: str, mode: str, rate: float) -> dict[str, Any]:
        return {"config": config, "label": config, "key": "rsa", "tls": "1.2", "mode": mode, "rate": rate,
                "connections": 100, "resumption_ratio": 1.0 if mode == "resumed" else 0.0, "errors": 0,
                "first_error": "", "server_cpu_ms": 1.0, "client_cpu_ms": 1.0}  # fmt: skip

    results: dict[str, Any] = {
        "throughput": [
            row("twisted-sessions", "full", 300), row("twisted-sessions", "resumed", 1000),
            row("sesscache-memory", "full", 300), row("sesscache-memory", "resumed", 960),
        ],
        "unavailable": {"twistd-sesscache-redis": "no store"},
        "stall": [{"sessions": 100_000, "rss_per_session": 900, "der_bytes": 158,
                   "scheduled": {"worst_ms": 40.0, "removed": 100_000}, "sliced": {"worst_ms": 1.0}}],
    }  # fmt: skip
    verdicts = {t["target"]: t["verdict"] for t in report.targets(results)}
    assert verdicts["resumed rate, memory ≥ 0.95× bare Twisted enableSessions=True (`sesscache-memory`)"] == "pass"
    assert verdicts["resumed/full ≥ 4× for TLS 1.2 RSA-2048 (`sesscache-memory`)"] == "miss"
    assert verdicts["worst reactor stall from a scheduled flush of 100,000 sessions < 20 ms"] == "miss"
    assert verdicts["≤ 1 KiB per cached session, OpenSSL's cache (`sesscache-memory`)"] == "pass"
    # A short stall while the loop flushed nothing measures nothing.
    results["stall"][0]["scheduled"] = {"worst_ms": 1.0, "removed": 0}
    stalled = {t["target"]: t for t in report.targets(results)}["worst reactor stall from a scheduled flush of 100,000 sessions < 20 ms"]
    assert stalled["verdict"] == "miss" and "removed only 0" in stalled["measured"]
    redis = [t for t in report.targets(results) if "Redis across processes" in t["target"]]
    assert redis[0]["verdict"] == "not measured" and "no store" in redis[0]["measured"]


def test_chart_is_optional(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    assert report.chart({"throughput": []}, tmp_path / "x.png") is None


def test_profile_samples_are_charged_to_their_owner() -> None:
    twisted = "TLSMemoryBIOProtocol._checkHandshakeStatus (twisted/protocols/tls.py:1)"
    passthrough = "WatchedConnection.do_handshake (twisted_sesscache/connection.py:1)"
    handshake = "Connection.do_handshake (OpenSSL/SSL.py:1)"
    sealing = "Sealer.open (twisted_sesscache/sealing.py:1)"
    aead = "AESGCM.decrypt (cryptography/hazmat/primitives/ciphers/aead.py:1)"
    assert profiling.owner([twisted, passthrough, handshake]) == "pyOpenSSL + OpenSSL"
    assert profiling.owner([twisted, sealing, aead]) == "twisted-sesscache"
    assert profiling.owner(["EPollReactor.doPoll (twisted/internet/epollreactor.py:1)"]) == "Twisted"


# -- workers: /stats.json differences, the report's sections, the anchors' command lines ---------


def _worker(index: int, pid: int, accept: int, hits: int, cb_hits: int) -> dict[str, Any]:
    return {"worker": index, "pid": pid, "accept": accept, "hits": hits, "cb_hits": cb_hits, "misses": 0}


def test_pool_difference_counts_each_worker_between_snapshots() -> None:
    before = {"workers": 2, "per_worker": [_worker(0, 10, 5, 2, 0), _worker(1, 11, 5, 1, 1)]}
    after = {"workers": 2, "per_worker": [_worker(0, 10, 105, 82, 30), _worker(1, 12, 60, 40, 20)]}  # worker 1 replaced
    counted = pool.difference(before, after)
    assert counted is not None
    assert [w["accept"] for w in counted["per_worker"]] == [100, 60]  # the new worker 1 counts from zero
    assert counted["hits"] == 120 and counted["cb_hits"] == 50
    assert counted["cross_worker"] == pytest.approx(50 / 120)
    assert counted["busiest_share"] == pytest.approx(100 / 160)
    single = pool.difference({"accept": 3, "hits": 1}, {"accept": 13, "hits": 9})  # --workers 1: no per_worker
    assert single is not None and single["workers"] == 1 and single["hits"] == 8
    assert pool.difference(before, None) is None
    assert pool.combined([None, counted, single])["workers"] == 3  # type: ignore[index]


def _rows(config: str, full: float, resumed: float, cpu: float, cross: float | None = None) -> list[dict[str, Any]]:
    rows = []
    for mode, rate in (("full", full), ("resumed", resumed)):
        row: dict[str, Any] = {"config": config, "label": config, "key": "rsa", "tls": "1.3", "mode": mode, "rate": rate,
                               "connections": 1000, "resumption_ratio": 1.0, "errors": 0, "first_error": "",
                               "server_cpu_ms": cpu * (2 if mode == "full" else 1), "client_cpu_ms": 1.0}  # fmt: skip
        if cross is not None:
            hits = 600 if mode == "resumed" else 0
            workers = [_worker(0, 1, 500, hits // 2, int(hits * cross / 2)), _worker(1, 2, 500, hits // 2, int(hits * cross / 2))]
            row.update(pool=pool.summarise([{**w, **dict.fromkeys(pool.COUNTS[3:], 0)} for w in workers]), leader_cpu_ms=0.1)
        rows.append(row)
    return rows


def test_workers_section_shows_the_split_the_cross_worker_share_and_the_ratio() -> None:
    results = {"throughput": [*_rows("twistd-workers-1", 300, 600, 1.0), *_rows("twistd-workers-2", 450, 900, 1.1, 0.5),
                              *_rows("nginx-2", 900, 2000, 0.3)]}  # fmt: skip
    text = "\n".join(report_workers.workers_section(results))
    assert "`twistd-workers-2` | 450 | 900 |" in text
    assert "| 50/50 | 50% |" in text
    assert "resumed 1.50×" in text and "full 1.50×" in text
    assert "`nginx-2`" in text
    assert report_workers.workers_section({"throughput": _rows("nginx-2", 1, 2, 0.3)}) == []


def test_scaling_section_gives_the_ratio_per_cpu_set_and_labels_the_expectation() -> None:
    scaling = []
    for cpus, one, two in (("0", 500, 450), ("0,1", 520, 700)):
        scaling += _rows(f"twistd-workers-1@cpu{cpus}", one / 2, one, 1.0) + _rows(f"twistd-workers-2@cpu{cpus}", two / 2, two, 1.2)
    results = {"scaling": scaling, "throughput": _rows("twistd-workers-2", 450, 900, 1.1, 0.5),
               "lmdb_cost": {"set (at the bound: evicts the oldest)": 10.0}}  # fmt: skip
    text = "\n".join(report_workers.scaling_section(results))
    assert "| `taskset -c 0` | 250 | 500 | 225 | 450 | 0.90× | 0.90× |" in text
    assert "| `taskset -c 0,1` |" in text and "1.35×" in text
    assert "Expected on 16 cores" in text and "not measured" in text
    assert "100,000 new sessions/s" in text  # 1 / 10 µs
    assert report_workers.scaling_section({}) == []


def test_bytes_per_session_are_reported_and_judged() -> None:
    results = {"bytes": [
        {"store": "lmdb", "config": "twistd-workers-1", "tls": "1.2", "connections": 2000, "errors": 0, "records": 2000,
         "bytes_per_record": 614.0, "payload_per_record": 284.0},
        {"store": "redis", "config": "twistd-sesscache-redis", "unavailable": "`redis-server` is not installed"},
    ]}  # fmt: skip
    text = "\n".join(report_workers.bytes_section(results))
    assert "| lmdb | 1.2 | 2,000 | 2,000 | 614 | 284 |" in text
    assert "not available: `redis-server` is not installed" in text
    verdicts = {t["target"]: t for t in report.targets(results)}
    assert verdicts["≤ 1 KiB per cached session, LMDB bytes per record"]["verdict"] == "pass"
    assert verdicts["≤ 1 KiB per cached session, Redis bytes per key"]["verdict"] == "not measured"


def test_hit_rate_across_workers_is_a_target() -> None:
    counted = pool.summarise([{**_worker(0, 1, 300, 260, 130), **dict.fromkeys(pool.COUNTS[3:], 0)},
                              {**_worker(1, 2, 300, 260, 130), **dict.fromkeys(pool.COUNTS[3:], 0)}])  # fmt: skip
    results = {"hitrate": [{"config": "twistd-workers-2", "fleet": 1, "tls": "1.3", "clients": 60, "visits": 10,
                            "offered": 540, "resumed": 540, "errors": 0, "ratio": 1.0, "pool": counted}]}  # fmt: skip
    verdicts = {t["target"]: t for t in report.targets(results)}
    target = verdicts["hit rate ≥ 99 % for returning clients across workers (`--workers 2`, LMDB)"]
    assert target["verdict"] == "pass" and "50% answered by another worker" in target["measured"]
    assert "| `twistd-workers-2` | 1 (2 workers) | 1.3 | 540 / 540 | 100.0% | 100% | 50% | 0 |" in report.markdown(results, None)


def test_anchor_and_pinned_command_lines(tmp_path: Path) -> None:
    certificate, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.write_text("CERT\n")
    key.write_text("KEY\n")
    launch = servers.Launch(certificate, key, tmp_path, 4433)
    command = servers.BY_NAME["haproxy"].command(launch)
    assert command[:2] == ["haproxy", "-db"]
    config = Path(command[-1]).read_text()
    assert "nbthread 2" in config and "http-request return status 200" in config and "no-tls-tickets" in config
    assert (tmp_path / "haproxy-0" / "server.pem").read_text() == "CERT\nKEY\n"  # HAProxy's one-file crt
    servers.BY_NAME["nginx-2"].command(launch)
    assert "worker_processes 2;" in (tmp_path / "nginx-0" / "nginx.conf").read_text()
    pinned = servers.pinned(servers.BY_NAME["twistd-workers-2"], "0,1")
    assert pinned.name == "twistd-workers-2@cpu0,1" and pinned.stats
    assert pinned.command(servers.Launch(certificate, key, tmp_path, 4433, stats_port=9))[:3] == ["taskset", "-c", "0,1"]
    assert [c.name for c in servers.SCALING] == [f"twistd-workers-{n}@cpu{c}" for c in ("0", "0,1") for n in (1, 2)]


@pytest.mark.slow
def test_workers_hit_rate_run_reads_every_worker(bench_dir: Path) -> None:
    """Returning clients against --workers 2: each worker's counts come back from /stats.json."""
    directory = bench_dir / "workers"
    results = directory / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "twistd-workers-2", "--parts", "hitrate",
         "--json", str(results), "--output", str(directory / "benchmarks.md"), "--no-chart"],
        capture_output=True, text=True, timeout=300, env=servers.child_environment(), check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(results.read_text())
    if "twistd-workers-2" in loaded["unavailable"]:
        pytest.skip(loaded["unavailable"]["twistd-workers-2"])
    from twisted_sesscache import RUNTIME

    (row,) = loaded["hitrate"]
    assert row["errors"] == 0 and row["offered"] > 0
    if RUNTIME.shared:  # under PyPI's wheels each worker resumes only its own sessions (the pool warns)
        assert row["resumed"] >= 0.95 * row["offered"], row
    assert row["pool"]["workers"] == 2
    assert sum(w["accept"] for w in row["pool"]["per_worker"]) == row["offered"] + row["clients"]


@pytest.mark.slow
def test_make_run_demo_starts_two_workers_and_its_stats_recipe_works(tmp_path: Path) -> None:
    """scripts/run-demo.sh as `make run` runs it: the banner's recipes work against what it starts."""
    from twisted_sesscache import RUNTIME
    from twisted_sesscache.status import SESSION_FILE

    if not RUNTIME.shared:
        pytest.skip("make run uses the shared-OpenSSL runtime (its --flush-interval and shared sessions need it)")
    port, stats = processes.free_port(), processes.free_port()
    env = {**servers.child_environment(), "SESSCACHE_PORT": str(port), "SESSCACHE_STATS_PORT": str(stats)}
    log = tmp_path / "demo.log"
    demo = processes.spawn(["bash", str(servers.REPO / "scripts" / "run-demo.sh"), str(Path(sys.executable).parents[1])],
                           log, cwd=servers.REPO, env=env)  # fmt: skip
    try:
        processes.wait_for_port(stats, demo, log)
        assert pool.wait_ready(stats), processes.tail(log)
        banner = log.read_text()
        watch = [line.strip().replace(SESSION_FILE, str(tmp_path / "s.pem")) for line in banner.splitlines()
                 if "openssl s_client" in line and line.startswith("  ")]  # fmt: skip
        said = [subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=30).stdout for line in watch[:2]]
        assert said[0].startswith("New,") and said[1].startswith("Reused,"), said
        (recipe,) = [line.strip() for line in banner.splitlines() if line.strip().startswith("curl -s")]
        printed = subprocess.run(["bash", "-c", recipe], capture_output=True, text=True, timeout=30).stdout.splitlines()
        assert printed[0].startswith("2 workers,"), printed
        assert [line.split()[:2] for line in printed[1:]] == [["worker", "0"], ["worker", "1"]], printed
    finally:
        processes.stop(demo, timeout=15)


def test_lmdb_usage_counts_the_records_and_pages_of_a_store(tmp_path: Path) -> None:
    """store_bytes' reading of an LMDB store (in the bench a twistd has it open; py-lmdb refuses a second
    handle on one environment in the same process, so here the store is closed first)."""
    pytest.importorskip("lmdb")
    from bench import store_bytes
    from twisted_sesscache.stores.lmdb import LMDBStore

    path = tmp_path / "sessions"
    LMDBStore(path, 1000).close()
    empty = store_bytes.lmdb_usage(path)
    store = LMDBStore(path, 1000)
    for i in range(200):
        store.set(b"key-%03d" % i, b"v" * 250, 300)
    store.close()
    filled = store_bytes.lmdb_usage(path)
    assert filled["entries"] - empty["entries"] == 200
    assert filled["payload"] - empty["payload"] == 200 * (7 + 8 + 250)  # key, 8-byte expiry, value
    assert 200 * 250 <= filled["bytes"] - empty["bytes"] <= 200 * 4096


def test_instruction_counts_are_reported_as_ratios_to_bare_twisted() -> None:
    def row(config: str, tls: str, count: float) -> dict[str, Any]:
        return {"config": config, "tls": tls, "key": "rsa", "connections": 400, "resumed": 400, "errors": 0,
                "instructions": count}  # fmt: skip

    results: dict[str, Any] = {"instructions": {"rows": [
        row("twisted-sessions", "1.2", 1.2e6), row("twisted-sessions", "1.3", 3.0e6),
        row("sesscache-memory", "1.2", 1.25e6), row("sesscache-memory", "1.3", 3.0e6),
        row("sesscache-redis", "1.2", 1.5e6),
    ], "unavailable": {}}}  # fmt: skip
    assert report_instructions.ratios(results, "sesscache-memory") == {"1.2": 0.96, "1.3": 1.0}
    assert report_instructions.ratios(results, "sesscache-redis") == {"1.2": 0.8}
    assert report_instructions.ratio_text(results, "nginx") == ""
    text = "\n".join(report_instructions.section(results))
    assert "| `sesscache-redis` | 1.500 M | 0.80× | – | – | 400/400 |" in text
    missing = report_instructions.section({"instructions": {"rows": [], "unavailable": {"x": "`valgrind` is not installed"}}})
    assert "`valgrind` is not installed" in "\n".join(missing)
    assert report_instructions.section({}) == []


@pytest.mark.skipif(servers.executable("valgrind")() is not None, reason="valgrind is not installed")
def test_a_real_callgrind_dump_gives_its_instruction_total(tmp_path: Path) -> None:
    dump = tmp_path / "true.out"
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={dump}", "true"],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    assert instructions.dumped_instructions(dump) > 10_000  # even `true` runs the dynamic loader
    command = instructions.under_callgrind(servers.BY_NAME["twisted-sessions"], tmp_path).command(
        servers.Launch(tmp_path / "c.pem", tmp_path / "k.pem", tmp_path, 4433)
    )
    assert command[:2] == ["valgrind", "--tool=callgrind"] and "bench.tlsserver" in command

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

from bench import processes, profiling, report, servers
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

    results = {
        "throughput": [
            row("twisted-sessions", "full", 300), row("twisted-sessions", "resumed", 1000),
            row("sesscache-memory", "full", 300), row("sesscache-memory", "resumed", 960),
        ],
        "unavailable": {"twistd-sesscache-redis": "no store"},
        "stall": [{"sessions": 100_000, "rss_per_session": 900, "der_bytes": 158,
                   "scheduled": {"worst_ms": 40.0}, "sliced": {"worst_ms": 1.0}}],
    }  # fmt: skip
    verdicts = {t["target"]: t["verdict"] for t in report.targets(results)}
    assert verdicts["resumed rate, memory ≥ 0.95× bare Twisted enableSessions=True (`sesscache-memory`)"] == "pass"
    assert verdicts["resumed/full ≥ 4× for TLS 1.2 RSA-2048 (`sesscache-memory`)"] == "miss"
    assert verdicts["worst reactor stall from a scheduled flush of 100,000 sessions < 20 ms"] == "miss"
    assert verdicts["≤ 1 KiB per cached session, OpenSSL's cache (`sesscache-memory`)"] == "pass"
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

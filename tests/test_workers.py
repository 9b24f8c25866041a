"""``twistd sesscache --workers N``: one port, N processes, sessions shared through LMDB, supervised."""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support import TLSFiles, free_port, make_tls_files, s_client
from tests.test_tap import Twistd, assert_clean_exit, assert_usage_error, files_args, get, parse, run_twistd, twistd
from twisted_sesscache import RUNTIME
from twisted_sesscache.workers import worker_count
from twisted_sesscache.workerstats import combine

shared_only = pytest.mark.skipif(
    not RUNTIME.shared,
    reason="workers share server sessions through OpenSSL's session callbacks, which PyPI wheels do not "
    "expose (shared-OpenSSL runtime only)",
)


@contextmanager
def pool(tmp: Path, files: TLSFiles, *extra: str, workers: str = "2") -> Iterator[tuple[int, int, Twistd]]:
    """A ``--workers`` parent with its stats listener; yields (TLS port, stats port, process)."""
    tls_port, stats_port = free_port(), free_port()
    with twistd(tmp, "sesscache", *files_args(files), "--workers", workers,
                "--listen", f"tcp:{tls_port}:interface=127.0.0.1",
                "--stats", f"tcp:{stats_port}:interface=127.0.0.1", *extra) as process:
        process.wait_for(tls_port, stats_port)
        wait_until(lambda: stats(stats_port)["workers_answering"] == int(workers), process)
        yield tls_port, stats_port, process


def stats(port: int) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(get(f"http://127.0.0.1:{port}/stats.json"))
    return found


def wait_until(condition: Any, process: Twistd, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"not so after {timeout} s\n{process.output()}")


def pairs(port: int, tmp: Path, tls: str, count: int) -> int:
    """``count`` new-then-resume pairs, each connection on a fresh TCP connection; how many resumed."""
    resumed = 0
    for i in range(count):
        session = tmp / f"pair-{tls}-{i}.pem"
        assert s_client(port, tls=tls, sess_out=session) == "New"
        resumed += s_client(port, tls=tls, sess_in=session) == "Reused"
    return resumed


# -- options ------------------------------------------------------------------------


def test_worker_counts() -> None:
    assert worker_count("1") == 1 and worker_count("4") == 4 and worker_count(None) == 1
    assert worker_count("auto") == len(os.sched_getaffinity(0))


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_auto_counts_the_cpus_taskset_leaves() -> None:
    """As nginx's ``worker_processes auto``: a process pinned to one CPU starts one worker."""
    done = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c",
         "from twisted_sesscache.workers import worker_count; print(worker_count('auto'))"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == "1", done


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", ""])
def test_bad_worker_counts_are_one_line(tls_files: TLSFiles, value: str) -> None:
    done = run_twistd("sesscache", *files_args(tls_files), "--workers", value)
    assert_usage_error(done, "--workers")


def test_more_than_one_worker_defaults_to_an_lmdb_store(tls_files: TLSFiles, tmp_path: Path) -> None:
    options = parse(*files_args(tls_files), "--workers", "2", "--data-dir", str(tmp_path))
    assert options["config"].store == f"lmdb:{tmp_path / 'sessions'}"
    assert options["config"].store_key_file == str(tmp_path / "sessions.key")
    assert parse(*files_args(tls_files))["config"].store is None  # one process: no store unless asked


def test_statistics_are_summed_settings_shown_once() -> None:
    summary = combine([
        {"accept": 3, "hits": 1, "timeout": 300, "store_entries": 7, "runtime": "x", "client": {"hits": 1}},
        {"accept": 4, "hits": None, "timeout": 300, "store_entries": 9, "runtime": "x", "client": {"hits": 2}},
    ])
    assert summary == {"accept": 7, "hits": 1, "timeout": 300, "store_entries": 9, "runtime": "x",
                       "client": {"hits": 3}}


# -- sessions across workers ----------------------------------------------------------


@shared_only
def test_two_workers_resume_each_others_sessions(tmp_path: Path, tls_files: TLSFiles) -> None:
    with pool(tmp_path, tls_files) as (port, stats_port, process):
        resumed = {tls: pairs(port, tmp_path, tls, 30) for tls in ("1.2", "1.3")}
        summary = stats(stats_port)
    assert resumed["1.2"] >= 29 and resumed["1.3"] >= 29, (resumed, process.output()[-3000:])
    per_worker = summary["per_worker"]
    assert summary["workers"] == 2 and len(per_worker) == 2
    for key in ("accept", "accept_good", "hits", "cb_hits", "store_hits", "store_writes"):
        assert summary[key] == sum(worker[key] for worker in per_worker), key
    assert summary["accept_good"] >= 120
    assert summary["hits"] >= resumed["1.2"] + resumed["1.3"]
    assert len({worker["pid"] for worker in per_worker}) == 2
    print(f"resumed {resumed} of 30 each; accepted per worker {[w['accept'] for w in per_worker]}; "
          f"resumed from the store (the other worker's sessions) {summary['cb_hits']} of {summary['hits']}")


@shared_only
@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_shared_ticket_keys_through_lmdb(tmp_path: Path, tls_files: TLSFiles, tls: str) -> None:
    with pool(tmp_path, tls_files, "--tickets", "shared") as (port, stats_port, _):
        time.sleep(0.3)  # each worker fetches the epoch's key at start
        resumed = pairs(port, tmp_path, tls, 10)
        summary = stats(stats_port)
    assert resumed >= 9, resumed
    assert summary["store_hits"] == 0, "tickets, not stored sessions, resumed"


def test_metrics_are_served_once_for_all_workers(tmp_path: Path, tls_files: TLSFiles) -> None:
    with pool(tmp_path, tls_files) as (port, stats_port, _):
        for _ in range(4):
            s_client(port)
        text = get(f"http://127.0.0.1:{stats_port}/metrics").decode()
        summary = stats(stats_port)
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#") and "{" not in line}
    assert samples["sesscache_workers"] == 2
    assert samples["sesscache_accept_good_total"] == summary["accept_good"] >= 4


# -- supervision ---------------------------------------------------------------------


def test_a_killed_worker_is_replaced(tmp_path: Path, tls_files: TLSFiles) -> None:
    with pool(tmp_path, tls_files) as (port, stats_port, process):
        before = {worker["pid"] for worker in stats(stats_port)["per_worker"]}
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        results = [s_client(port) for _ in range(20)]  # right away: the other worker and the queue serve
        assert results == ["New"] * 20
        wait_until(lambda: len({w.get("pid") for w in stats(stats_port)["per_worker"]} - before) == 1
                   and stats(stats_port)["workers_answering"] == 2, process)
        assert f"(pid {victim}) was killed by signal 9; a new one starts in" in process.output()
        assert s_client(port) == "New"
        assert_clean_exit(process)


def test_sigterm_drains_every_worker(tmp_path: Path, tls_files: TLSFiles) -> None:
    with pool(tmp_path, tls_files) as (port, stats_port, process):
        pids = [worker["pid"] for worker in stats(stats_port)["per_worker"]]
        assert s_client(port) == "New"
        assert_clean_exit(process)
    output = process.output()
    assert output.count("Main loop terminated.") == 3, output  # both workers and the parent
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def served_certificate(port: int) -> bytes:
    """The DER certificate a new connection gets."""
    return ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", port), timeout=10))


def der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def test_sighup_renews_the_certificate_and_sessions_survive(tmp_path: Path, tls_files: TLSFiles) -> None:
    live = TLSFiles(tmp_path / "live-cert.pem", tmp_path / "live-key.pem")
    shutil.copy(tls_files.certificate, live.certificate)
    shutil.copy(tls_files.private_key, live.private_key)
    renewed = make_tls_files(tmp_path / "renewed")
    session = {tls: tmp_path / f"before-{tls}.pem" for tls in ("1.2", "1.3")}
    with pool(tmp_path, live) as (port, stats_port, process):
        old = served_certificate(port)
        for tls, path in session.items():
            assert s_client(port, tls=tls, sess_out=path) == "New"
        shutil.copy(renewed.certificate, live.certificate)
        shutil.copy(renewed.private_key, live.private_key)
        process.process.send_signal(signal.SIGHUP)
        wait_until(lambda: process.output().count("serves certificate") == 2, process)
        new = served_certificate(port)
        assert new != old and new == der(renewed.certificate)
        assert stats(stats_port)["workers_answering"] == 2  # nobody restarted
        if RUNTIME.shared:  # sessions cross the renewal through the store and the kept session-ID context
            assert [s_client(port, tls=tls, sess_in=path) for tls, path in session.items()] == ["Reused"] * 2
        assert_clean_exit(process)


def test_a_broken_renewal_keeps_the_old_certificate(tmp_path: Path, tls_files: TLSFiles) -> None:
    live = TLSFiles(tmp_path / "live-cert.pem", tmp_path / "live-key.pem")
    shutil.copy(tls_files.certificate, live.certificate)
    shutil.copy(tls_files.private_key, live.private_key)
    with pool(tmp_path, live) as (port, _, process):
        live.certificate.write_text("not a certificate\n")
        process.process.send_signal(signal.SIGHUP)
        wait_until(lambda: process.output().count("kept its certificate") == 2, process)
        assert served_certificate(port) == der(tls_files.certificate)


def test_a_damaged_default_store_is_refused_before_workers_start(tmp_path: Path, tls_files: TLSFiles) -> None:
    (tmp_path / "sessions").mkdir()
    (tmp_path / "sessions" / "data.mdb").write_bytes(os.urandom(8192))
    done = run_twistd("-n", "--pidfile=", "sesscache", *files_args(tls_files), "--workers", "2",
                      "--data-dir", str(tmp_path), "--listen", f"tcp:{free_port()}:interface=127.0.0.1")
    assert_usage_error(done, "--store")
    assert "Worker 0 started" not in done.stdout + done.stderr

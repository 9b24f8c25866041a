"""``twistd sesscache``: option parsing, the status page, /stats.json and /metrics, and the real twistd."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.python import usage

from bench import processes
from tests.support import ReactorThread, TLSFiles, free_port, resume_series, wait_for_port
from twisted_sesscache import RUNTIME, CacheMode, SessionCache, __version__
from twisted_sesscache.config import Tickets, default_flush_interval
from twisted_sesscache.metrics import METRICS, metric_name, registry_for
from twisted_sesscache.tap import DEFAULT_LISTEN, Options, SessionCacheService, makeService

REPO = Path(__file__).resolve().parents[1]
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; sys.exit(run())"

SHARED_WHY = "a cache size and a scheduled flush are refused under PyPI wheels"
BUNDLED_WHY = "the shared-OpenSSL runtime accepts --session-cache-size and --flush-interval"


# -- helpers shared with test_proxy / test_endpoints ---------------------------------


def twistd_env() -> dict[str, str]:
    """PYTHONPATH starts at the repository, so twisted/plugins/sesscache_plugins.py is found."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_twistd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``twistd ARGS`` to completion (for runs that must stop by themselves)."""
    return subprocess.run(
        [sys.executable, "-c", TWISTD, *args], cwd=REPO, env=twistd_env(),
        capture_output=True, text=True, timeout=timeout, check=False,
    )


class Twistd:
    """A ``twistd -n`` subprocess whose output goes to a file."""

    def __init__(self, workdir: Path, args: tuple[str, ...]) -> None:
        self.log = workdir / f"twistd-{os.getpid()}-{id(self)}.log"
        with self.log.open("wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-c", TWISTD, "-n", "--pidfile=", *args],
                cwd=REPO, env=twistd_env(), stdout=output, stderr=subprocess.STDOUT,
            )

    def wait_for(self, *ports: int) -> None:
        for port in ports:
            try:
                wait_for_port(port, process=self.process)
            except processes.ServerFailed as error:
                raise AssertionError(f"{error}\n{self.output()}") from None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; the exit status."""
        return processes.stop(self.process, timeout=15)


@contextmanager
def twistd(workdir: Path, *args: str) -> Iterator[Twistd]:
    process = Twistd(workdir, args)
    try:
        yield process
    finally:
        process.stop()


def assert_clean_exit(process: Twistd) -> None:
    status = process.stop()
    output = process.output()
    # twistd re-raises the SIGTERM it shut down on, so its parent sees the signal.
    assert status in (0, -signal.SIGTERM), output
    assert "Traceback" not in output, output
    assert "Server Shut Down." in output, output


def assert_usage_error(done: subprocess.CompletedProcess[str], option: str) -> None:
    """Non-zero exit, no traceback, and exactly one line: ``twistd ...: <option>...``."""
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Traceback" not in output, output
    error_lines = [line for line in output.splitlines() if line.startswith("twistd") and ": --" in line]
    assert len(error_lines) == 1, output
    assert option in error_lines[0], error_lines[0]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text exposition, by name."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def assert_metrics_match(stats: dict[str, Any], metrics_text: str) -> None:
    samples = parse_metrics(metrics_text)
    for key, value in stats.items():
        if key not in METRICS:
            continue
        if value is None:
            assert metric_name(key) not in samples, f"{key} is unknown here and must not be exported as 0"
        else:
            assert samples[metric_name(key)] == value, key
    assert (f'sesscache_info{{mode="{stats["mode"]}",runtime="{stats["runtime"]}",version="{__version__}"}} 1.0'
            in metrics_text)
    assert "process_cpu_seconds_total" in metrics_text and "python_info" in metrics_text


def files_args(files: TLSFiles) -> list[str]:
    return ["--certificate", str(files.certificate), "--private-key", str(files.private_key)]


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


# -- options ------------------------------------------------------------------------


def test_defaults(tls_files: TLSFiles) -> None:
    options = parse(*files_args(tls_files))
    assert options["listen"] == DEFAULT_LISTEN == "tcp:8443:interface=127.0.0.1"
    cache = SessionCache(config=options["config"])
    assert cache.store is None and cache.external is None
    assert options["tickets"] is Tickets.OFF
    assert options["keep-sessions-on-truncation"] is True
    assert options["upstream"] is None and options["stats"] is None
    assert (cache.config.mode, cache.size, cache.timeout, cache.flush_interval) == (
        CacheMode.SERVER, None, 300, default_flush_interval(RUNTIME))
    assert (cache.tickets, cache.keep_sessions_on_truncation, cache.session_id_context) == (False, True, None)
    assert options["certificateOptions"].enableSessionTickets is False


def test_every_option(tls_files: TLSFiles) -> None:
    options = parse(
        *files_args(tls_files),
        "--listen", "tcp:0:interface=127.0.0.1",
        "--upstream", "tcp:127.0.0.1:8080",
        "--session-cache-mode", "server,no-auto-clear",
        "--session-timeout", "60",
        "--session-id-context", "my-app",
        "--tickets",
        "--strict-truncation",
        "--stats", "tcp:0:interface=127.0.0.1",
    )
    assert options["listen"] == "tcp:0:interface=127.0.0.1"
    assert options["upstream"] == "tcp:127.0.0.1:8080"
    assert options["stats"] == "tcp:0:interface=127.0.0.1"
    cache = SessionCache(config=options["config"])
    assert cache.mode == CacheMode.SERVER | CacheMode.NO_AUTO_CLEAR
    assert cache.timeout == 60
    assert cache.session_id_context == b"my-app"
    assert cache.tickets is True and options["certificateOptions"].enableSessionTickets is True
    assert cache.keep_sessions_on_truncation is False


def test_flag_pairs_last_one_wins(tls_files: TLSFiles) -> None:
    options = parse(*files_args(tls_files), "--tickets", "--no-tickets", "--strict-truncation",
                    "--keep-sessions-on-truncation")
    assert options["tickets"] is Tickets.OFF and options["keep-sessions-on-truncation"] is True


def test_certificate_with_key_in_the_same_file(tls_files: TLSFiles, tmp_path: Path) -> None:
    both = tmp_path / "both.pem"
    both.write_bytes(tls_files.certificate.read_bytes() + tls_files.private_key.read_bytes())
    assert parse("--certificate", str(both))["certificateOptions"].privateKey is not None


@pytest.mark.shared_only(SHARED_WHY)
def test_size_and_flush_interval(tls_files: TLSFiles) -> None:
    options = parse(*files_args(tls_files), "--session-cache-size", "100", "--flush-interval", "2.5")
    cache = SessionCache(config=options["config"])
    assert (cache.size, cache.flush_interval) == (100, 2.5)
    assert cache.mode == CacheMode.SERVER | CacheMode.NO_AUTO_CLEAR  # a nonzero interval implies it


def test_flush_interval_zero_is_accepted_everywhere(tls_files: TLSFiles) -> None:
    """0 asks for nothing the bundled runtime lacks: OpenSSL keeps its own automatic clear."""
    assert parse(*files_args(tls_files), "--flush-interval", "0")["config"].flush_interval == 0


@pytest.mark.bundled_only(BUNDLED_WHY)
@pytest.mark.parametrize("option,value", [("--session-cache-size", "100"), ("--flush-interval", "5")])
def test_bundled_refuses_size_and_flush(tls_files: TLSFiles, option: str, value: str) -> None:
    with pytest.raises(usage.UsageError) as raised:
        parse(*files_args(tls_files), option, value)
    message = str(raised.value)
    assert message.startswith(option) and "shared-OpenSSL runtime" in message and "\n" not in message


def test_generated_certificate_is_throwaway() -> None:
    options = parse("--generate-certificate")
    assert options["certificateOptions"].certificate is not None
    assert not Path(options["certificate"]).exists(), "the temporary copy is removed once loaded"
    assert any("self-signed" in note for note in options.notes)


def test_generated_certificate_is_kept_in_data_dir(tmp_path: Path) -> None:
    first = parse("--generate-certificate", "--data-dir", str(tmp_path / "data"))
    cert = (tmp_path / "data" / "cert.pem").read_bytes()
    again = parse("--generate-certificate", "--data-dir", str(tmp_path / "data"))
    assert (tmp_path / "data" / "cert.pem").read_bytes() == cert, "a restart keeps the certificate"
    assert first["certificate"] == again["certificate"]


def _bad_inputs(tmp: Path, files: TLSFiles, other: TLSFiles) -> list[tuple[list[str], str]]:
    garbage = tmp / "garbage.pem"
    garbage.write_text("not a PEM file\n")
    good = files_args(files)
    return [
        ([*good, "--session-cache-mode", "sever"], "--session-cache-mode"),
        ([*good, "--session-cache-mode", "server,no-such-thing"], "--session-cache-mode"),
        ([*good, "--session-cache-size", "-1"], "--session-cache-size"),
        ([*good, "--session-cache-size", "lots"], "--session-cache-size"),
        ([*good, "--session-timeout", "0"], "--session-timeout"),
        ([*good, "--session-timeout", "-5"], "--session-timeout"),
        ([*good, "--session-timeout", "5m"], "--session-timeout"),
        ([*good, "--flush-interval", "-1"], "--flush-interval"),
        ([*good, "--flush-interval", "nan"], "--flush-interval"),
        ([*good, "--session-id-context", ""], "--session-id-context"),
        ([*good, "--session-id-context", "x" * 33], "--session-id-context"),
        ([*good, "--listen", "tcp:notaport"], "--listen"),
        ([*good, "--listen", "nosuchendpoint:1"], "--listen"),
        ([*good, "--listen", "ssl:8443"], "--listen"),
        ([*good, "--listen", "sesscache:8443:certificate=c.pem"], "--listen"),
        ([*good, "--stats", "tcp:notaport"], "--stats"),
        ([*good, "--upstream", "tcp:127.0.0.1"], "--upstream"),
        (["--certificate", str(tmp / "missing.pem")], "--certificate"),
        (["--certificate", str(garbage), "--private-key", str(files.private_key)], "--certificate"),
        (["--certificate", str(files.certificate), "--private-key", str(garbage)], "--private-key"),
        (["--certificate", str(files.certificate), "--private-key", str(tmp / "missing.pem")], "--private-key"),
        (["--certificate", str(files.certificate), "--private-key", str(other.private_key)], "--private-key"),
        (["--private-key", str(files.private_key)], "--private-key"),
        (["--generate-certificate", *good], "--generate-certificate"),
        ([], "--certificate"),
    ]


def test_bad_input_names_the_option(tmp_path: Path, tls_files: TLSFiles, other_tls_files: TLSFiles) -> None:
    for args, option in _bad_inputs(tmp_path, tls_files, other_tls_files):
        with pytest.raises(usage.UsageError) as raised:
            parse(*args)
        message = str(raised.value)
        assert message.startswith(option), (args, message)
        assert "\n" not in message, (args, message)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse("--version")
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert f"twisted-sesscache {__version__}" in out and RUNTIME.describe() in out


# -- services, status page and stats in-process -----------------------------------------


def test_make_service_builds_the_listeners(tls_files: TLSFiles) -> None:
    options = parse(*files_args(tls_files), "--listen", "tcp:0", "--stats", "tcp:0")
    children = list(makeService(options))
    assert isinstance(children[0], SessionCacheService) and children[0].cache.config is options["config"]
    assert [type(child) for child in children[1:]] == [StreamServerEndpointService] * 2
    assert len(list(makeService(parse(*files_args(tls_files), "--listen", "tcp:0")))) == 2


def _port_of(listener: StreamServerEndpointService) -> Deferred[Any]:
    """The listener's port, without taking it out of the service's own Deferred."""
    port: Deferred[Any] = Deferred()

    def got(result: Any) -> Any:
        port.callback(result)
        return result

    listener._waitingForPort.addCallback(got)
    return port


@contextmanager
def started(rt: ReactorThread, options: Options) -> Iterator[list[int]]:
    """makeService(options) started in the reactor thread; yields the listening ports."""
    top = makeService(options)
    rt.call(top.privilegedStartService)
    rt.call(top.startService)
    try:
        ports = [rt.call(_port_of, listener) for listener in list(top)[1:]]
        yield [port.getHost().port for port in ports]
    finally:
        rt.call(top.stopService)


class Browser:
    """HTTPS over Python's ssl, one TLS context, so that sessions can be offered back."""

    def __init__(self, tls: ssl.TLSVersion) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.context.check_hostname, self.context.verify_mode = False, ssl.CERT_NONE
        self.context.minimum_version = self.context.maximum_version = tls
        self.session: ssl.SSLSession | None = None

    def get(self, port: int, path: str, close: bool = True) -> bytes:
        """One HTTP/1.1 request on a new connection offering the last session; reads until the server closes."""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with self.context.wrap_socket(raw, server_hostname="localhost", session=self.session) as conn:
                header = "Connection: close\r\n" if close else ""
                conn.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{header}\r\n".encode())
                response = b""
                while chunk := conn.recv(65536):
                    response += chunk
                self.session = conn.session  # TLS 1.3: the ticket came with the response
                try:
                    conn.unwrap()  # answer the server's close_notify: a clean close, not a truncated one
                except (OSError, ssl.SSLError):
                    pass
                return response


@pytest.mark.parametrize("tls", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_status_page_shows_resumption(reactor_thread: ReactorThread, tls_files: TLSFiles, tls: ssl.TLSVersion) -> None:
    options = parse(*files_args(tls_files), "--listen", "tcp:0:interface=127.0.0.1")
    browser = Browser(tls)
    with started(reactor_thread, options) as (port,):
        first = browser.get(port, "/status.json")
        second = browser.get(port, "/status.json")
        page = browser.get(port, "/", close=False)
    assert b"connection: close" in page.lower(), "each reload must be a new TLS connection"
    before = json.loads(first.split(b"\r\n\r\n", 1)[1])
    after = json.loads(second.split(b"\r\n\r\n", 1)[1])
    expected = "TLSv1.2" if tls == ssl.TLSVersion.TLSv1_2 else "TLSv1.3"
    assert before["connection"] == {"tls": True, "protocol": expected, "resumed": False,
                                    "cipher": before["connection"]["cipher"]}
    assert after["connection"]["resumed"] is True
    assert after["cache"]["hits"] >= 1 and after["cache"]["runtime"] == RUNTIME.name
    assert any("-sess_in" in command for command in after["watch"])
    assert b"Resumed" in page and b"openssl s_client" in page and expected.encode() in page


def test_stats_listener_in_process(reactor_thread: ReactorThread, tls_files: TLSFiles) -> None:
    options = parse(*files_args(tls_files), "--listen", "tcp:0:interface=127.0.0.1",
                    "--stats", "tcp:0:interface=127.0.0.1")
    with started(reactor_thread, options) as (port, stats_port):
        browser = Browser(ssl.TLSVersion.TLSv1_2)
        browser.get(port, "/")
        browser.get(port, "/")
        stats = json.loads(get(f"http://127.0.0.1:{stats_port}/stats.json"))
        metrics = get(f"http://127.0.0.1:{stats_port}/metrics").decode()
    assert stats["hits"] == 1 and stats["runtime"] == RUNTIME.name
    assert_metrics_match(stats, metrics)


def test_collector_leaves_out_what_the_runtime_cannot_see() -> None:
    cache = SessionCache()
    text = generate_latest(registry_for(cache)).decode()
    assert_metrics_match(cache.stats(), text)
    assert ("sesscache_cache_full_total" in text) == RUNTIME.shared
    assert "sesscache_hits_total 0.0" in text


# -- the real twistd ------------------------------------------------------------------------


def test_twistd_end_to_end(tmp_path: Path) -> None:
    port, stats_port = free_port(), free_port()
    with twistd(
        tmp_path, "sesscache", "--listen", f"tcp:{port}:interface=127.0.0.1", "--generate-certificate",
        "--stats", f"tcp:{stats_port}:interface=127.0.0.1",
    ) as process:
        process.wait_for(port, stats_port)
        assert resume_series(port, tmp_path, 3, tls="1.2") == ["New", "Reused", "Reused"]
        assert resume_series(port, tmp_path, 3, tls="1.3") == ["New", "Reused", "Reused"]
        stats = json.loads(get(f"http://127.0.0.1:{stats_port}/stats.json"))
        metrics = get(f"http://127.0.0.1:{stats_port}/metrics").decode()
        assert_clean_exit(process)
    assert stats["runtime"] == RUNTIME.name
    # The shared runtime flushes from the reactor by default, so OpenSSL's own auto-clear is off.
    assert stats["mode"] == ("server,no-auto-clear" if RUNTIME.shared else "server")
    assert stats["hits"] >= 2 and stats["timeout"] == 300
    assert_metrics_match(stats, metrics)
    output = process.output()
    assert RUNTIME.describe() in output and "-sess_in" in output


def test_twistd_bad_input(tmp_path: Path, tls_files: TLSFiles, other_tls_files: TLSFiles) -> None:
    good = files_args(tls_files)
    cases = [
        ([*good, "--session-cache-mode", "sever"], "--session-cache-mode"),
        ([*good, "--session-cache-size", "-1"], "--session-cache-size"),
        (["--certificate", str(tmp_path / "missing.pem")], "--certificate"),
        (["--certificate", str(tls_files.certificate), "--private-key", str(other_tls_files.private_key)],
         "--private-key"),
    ]
    for args, option in cases:
        done = run_twistd("-n", "--pidfile=", "sesscache", "--listen", "tcp:0:interface=127.0.0.1", *args)
        assert_usage_error(done, option)


@pytest.mark.bundled_only(BUNDLED_WHY)
def test_twistd_bundled_refuses_size_and_flush(tls_files: TLSFiles) -> None:
    for option, value in [("--session-cache-size", "100"), ("--flush-interval", "5")]:
        done = run_twistd("-n", "--pidfile=", "sesscache", "--listen", "tcp:0:interface=127.0.0.1",
                          *files_args(tls_files), option, value)
        assert_usage_error(done, option)
        assert "shared-OpenSSL runtime" in done.stdout


def test_twistd_version() -> None:
    done = run_twistd("sesscache", "--version")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"twisted-sesscache {__version__}" in done.stdout and RUNTIME.name in done.stdout

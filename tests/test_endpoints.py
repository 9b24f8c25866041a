"""The ``sesscache:`` server endpoint string, in-process and under ``twistd web --listen``."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock

from tests.support import InfoProtocol, ReactorThread, TLSFiles, free_port, resume_series
from tests.test_tap import assert_clean_exit, twistd
from twisted_sesscache import RUNTIME, CacheMode
from twisted_sesscache.config import default_flush_interval
from twisted_sesscache.endpoints import TLSServerEndpoint

SHARED_WHY = "size and flushInterval are refused under PyPI wheels"
BUNDLED_WHY = "the shared-OpenSSL runtime accepts size and flushInterval"


def description(files: TLSFiles, port: int | str = 0, **extra: str) -> str:
    parts = [
        f"sesscache:{port}",
        "interface=127.0.0.1",
        f"certificate={quoteStringArgument(str(files.certificate))}",
        f"privateKey={quoteStringArgument(str(files.private_key))}",
        *(f"{key}={value}" for key, value in extra.items()),
    ]
    return ":".join(parts)


def endpoint_for(text: str) -> TLSServerEndpoint:
    endpoint = serverFromString(reactor, text)
    assert isinstance(endpoint, TLSServerEndpoint)
    return endpoint


def test_parameters_reach_the_cache(tls_files: TLSFiles) -> None:
    endpoint = endpoint_for(description(tls_files, mode="server,no-auto-clear", timeout="60",
                                        sessionIdContext="shop", tickets="yes", keepSessionsOnTruncation="no"))
    cache = endpoint.cache
    assert cache is not None
    assert cache.mode == CacheMode.SERVER | CacheMode.NO_AUTO_CLEAR
    assert (cache.timeout, cache.session_id_context, cache.tickets) == (60, b"shop", True)
    assert cache.keep_sessions_on_truncation is False
    assert endpoint.wrapped._interface == "127.0.0.1"  # type: ignore[attr-defined]


def test_defaults(tls_files: TLSFiles) -> None:
    cache = endpoint_for(description(tls_files)).cache
    assert cache is not None
    assert (cache.config.mode, cache.size, cache.timeout, cache.flush_interval, cache.tickets) == (
        CacheMode.SERVER, None, 300, default_flush_interval(RUNTIME), False)
    assert cache.keep_sessions_on_truncation is True


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_in_process_listener_resumes(reactor_thread: ReactorThread, tls_files: TLSFiles, tmp_path: Path, tls: str) -> None:
    endpoint = endpoint_for(description(tls_files))
    port = reactor_thread.call(endpoint.listen, Factory.forProtocol(InfoProtocol))
    try:
        assert resume_series(cast(IPv4Address, port.getHost()).port, tmp_path, 3, tls=tls) == ["New", "Reused", "Reused"]
    finally:
        reactor_thread.call(port.stopListening)
    assert endpoint.cache is not None and reactor_thread.call(endpoint.cache.stats)["hits"] == 2


@pytest.mark.shared_only(SHARED_WHY)
def test_listening_runs_the_flush_loop_until_the_last_port_stops(
    reactor_thread: ReactorThread, tls_files: TLSFiles
) -> None:
    rt = reactor_thread
    endpoint = endpoint_for(description(tls_files, flushInterval="10", size="100"))
    cache, clock = endpoint.cache, Clock()
    assert cache is not None and cache.size == 100
    cache.use_clock(clock)
    factory = Factory.forProtocol(InfoProtocol)
    first, second = rt.call(endpoint.listen, factory), rt.call(endpoint.listen, factory)

    def flushes_after(seconds: float) -> int:
        clock.advance(seconds)
        return int(cache.stats()["flushes"])

    assert rt.call(flushes_after, 10) == 1
    rt.call(first.stopListening)
    assert rt.call(flushes_after, 10) == 2, "another port still listens"
    rt.call(second.stopListening)
    assert rt.call(flushes_after, 30) == 2, "no port listens: the flush loop stopped"


def _bad(files: TLSFiles, tmp: Path, other: TLSFiles) -> list[tuple[str, str]]:
    cert, key = quoteStringArgument(str(files.certificate)), quoteStringArgument(str(files.private_key))
    missing = quoteStringArgument(str(tmp / "missing.pem"))
    return [
        (description(files, colour="red"), "colour"),
        (f"sesscache:certificate={cert}", "port"),
        ("sesscache:8443", "certificate"),
        (description(files, port="https"), "port"),
        (description(files, mode="sever"), "mode"),
        (description(files, mode="server,bogus"), "mode"),
        (description(files, size="-1"), "size"),
        (description(files, timeout="0"), "timeout"),
        (description(files, flushInterval="-1"), "flushInterval"),
        (description(files, tickets="maybe"), "tickets"),
        (description(files, keepSessionsOnTruncation="perhaps"), "keepSessionsOnTruncation"),
        (description(files, sessionIdContext="x" * 33), "sessionIdContext"),
        (f"sesscache:0:certificate={missing}:privateKey={key}", "certificate"),
        (f"sesscache:0:certificate={cert}:privateKey={missing}", "privateKey"),
        (f"sesscache:0:certificate={cert}:privateKey={quoteStringArgument(str(other.private_key))}", "privateKey"),
    ]


def test_bad_parameters_are_named(tls_files: TLSFiles, other_tls_files: TLSFiles, tmp_path: Path) -> None:
    for text, parameter in _bad(tls_files, tmp_path, other_tls_files):
        with pytest.raises(ValueError) as raised:
            serverFromString(reactor, text)
        message = str(raised.value)
        assert message.startswith("sesscache endpoint: ") and parameter in message, (text, message)


@pytest.mark.bundled_only(BUNDLED_WHY)
@pytest.mark.parametrize("parameter,value", [("size", "100"), ("flushInterval", "5")])
def test_bundled_refuses_size_and_flush(tls_files: TLSFiles, parameter: str, value: str) -> None:
    with pytest.raises(ValueError) as raised:
        serverFromString(reactor, description(tls_files, **{parameter: value}))
    assert f"sesscache endpoint: {parameter}: " in str(raised.value) and "shared-OpenSSL" in str(raised.value)


def test_twistd_web_listens_through_sesscache(tls_files: TLSFiles, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<p>hello from twistd web</p>\n")
    port = free_port()
    with twistd(tmp_path, "web", "--listen", description(tls_files, port), "--path", str(site)) as process:
        process.wait_for(port)
        assert resume_series(port, tmp_path, 3, tls="1.2") == ["New", "Reused", "Reused"]
        assert resume_series(port, tmp_path, 3, tls="1.3") == ["New", "Reused", "Reused"]
        assert_clean_exit(process)

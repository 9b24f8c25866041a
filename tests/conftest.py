"""Fixtures shared by the suite (a reactor on its own thread, certificates, peers) and its markers.

The markers are registered in pyproject.toml and given their meaning here, once:

* ``@pytest.mark.shared_only("why")``: skipped unless the shared-OpenSSL runtime is active;
  the skip reason reads "needs the shared-OpenSSL runtime: why".
* ``@pytest.mark.bundled_only("why")``: the reverse, for tests of the bundled runtime's refusals;
  the reason reads "tests the bundled-OpenSSL runtime only: why".
* ``@pytest.mark.slow``: a test of many seconds (process fleets, a Redis outage, the quick
  bench); ``make test`` runs it, ``-m "not slow"`` leaves it out of a quick local run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ReactorThread, RedisProcess, TLSFiles, make_tls_files

RUNTIME_MARKERS = {
    "shared_only": (True, "needs the shared-OpenSSL runtime: "),
    "bundled_only": (False, "tests the bundled-OpenSSL runtime only: "),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Turn ``shared_only``/``bundled_only`` into skips (as ``skipif`` would) where the runtime differs."""
    shared: bool | None = None
    for item in items:
        for name, (wants_shared, prefix) in RUNTIME_MARKERS.items():
            marker = item.get_closest_marker(name)
            if marker is None:
                continue
            if len(marker.args) != 1 or not isinstance(marker.args[0], str) or marker.kwargs:
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{name} takes one argument, the reason why")
            if shared is None:
                from twisted_sesscache import RUNTIME

                shared = RUNTIME.shared
            if shared != wants_shared:
                item.add_marker(pytest.mark.skip(reason=prefix + marker.args[0]))


@pytest.fixture(scope="session")
def reactor_thread() -> Iterator[ReactorThread]:
    thread = ReactorThread()
    thread.start()
    yield thread
    thread.stop()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def other_tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A second, unrelated certificate (another listener, another CA)."""
    return make_tls_files(tmp_path_factory.mktemp("tls-other"))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    os.chmod(tmp_path, 0o700)
    return tmp_path


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()

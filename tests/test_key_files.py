"""Sealing key files as operators meet them: a new one is announced, odd files are refused at once."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import cast

import pytest
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher

from tests.test_tap import files_args, run_twistd
from tests.support import TLSFiles
from twisted_sesscache import SessionCache
from twisted_sesscache.exceptions import ConfigurationError
from twisted_sesscache.sealing import check_key_file, key_fingerprint, load_or_create_key_file
from twisted_sesscache.stores.memory import MemoryStore


class SharedMemoryStore(MemoryStore):
    """A memory store that claims to be shared, so that it needs a key file like Redis does."""

    shared = True


def test_a_new_key_file_is_a_warning_with_its_fingerprint(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)
    path = tmp_path / "sealing.key"
    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(cast(ILogObserver, events.append))
    try:
        cache = SessionCache(store=SharedMemoryStore(), store_key_file=str(path))
        again = SessionCache(store=SharedMemoryStore(), store_key_file=str(path))
    finally:
        globalLogPublisher.removeObserver(cast(ILogObserver, events.append))
    fingerprint = key_fingerprint(path.read_bytes())
    warnings = [formatEvent(e) for e in events if "sealing key file" in formatEvent(e)]
    assert len(warnings) == 1 and fingerprint in warnings[0] and str(path) in warnings[0], warnings
    assert cache.stats()["store_key_fingerprint"] == again.stats()["store_key_fingerprint"] == fingerprint


def test_a_fifo_as_key_file_is_refused_at_once(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o700)
    fifo = tmp_path / "key"
    os.mkfifo(fifo, 0o600)
    started = time.monotonic()
    with pytest.raises(ConfigurationError) as raised:
        check_key_file(fifo, setting="store_key_file")
    with pytest.raises(ValueError):
        load_or_create_key_file(fifo)
    assert time.monotonic() - started < 5
    assert "not a regular file" in str(raised.value)


def test_twistd_refuses_a_fifo_key_file_in_one_line(tmp_path: Path, tls_files: TLSFiles) -> None:
    os.chmod(tmp_path, 0o700)
    fifo = tmp_path / "key"
    os.mkfifo(fifo, 0o600)
    done = run_twistd("-n", "--pidfile=", "sesscache", "--listen", "tcp:0:interface=127.0.0.1",
                      *files_args(tls_files), "--store", "memory", "--store-key-file", str(fifo), timeout=30)
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in output, output
    assert "--store-key-file" in output and "not a regular file" in output

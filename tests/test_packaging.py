"""`pip install .` must ship the twistd plugin and the package's subpackages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_plugins_and_subpackages(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("setuptools") is None or (
        importlib.util.find_spec("wheel") is None and importlib.util.find_spec("setuptools.command.bdist_wheel") is None
    ):
        pytest.skip("this environment lacks setuptools' bdist_wheel (old setuptools without 'wheel'), "
                    "so no wheel can be built offline here; the other runtime's environment builds it")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = tmp_path.glob("twisted_sesscache-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/sesscache_plugins.py" in names
    assert "twisted/plugins/__init__.py" not in names, "must not shadow Twisted's own twisted/plugins package"
    for module in ("cache.py", "runtime.py", "stores/redis.py", "stores/sealed.py", "bench/__main__.py", "tap.py"):
        assert f"twisted_sesscache/{module}" in names, module
    assert not any(name.startswith("tests/") for name in names)

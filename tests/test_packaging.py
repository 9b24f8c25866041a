"""`pip install .` must ship the twistd plugin, every module of the package, py.typed and the licence; not tests/ or bench/."""

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
    sources = {path.relative_to(REPO).as_posix() for path in (REPO / "twisted_sesscache").rglob("*.py")}
    assert len(sources) > 10 and "twisted_sesscache/stores/redis.py" in sources
    assert sources <= names, sorted(sources - names)
    assert "twisted_sesscache/py.typed" in names, "PEP 561: the annotations are for users' type checkers too"
    assert any(name.endswith(".dist-info/LICENSE") or ".dist-info/licenses/LICENSE" in name for name in names)
    assert not any(name.startswith(("tests/", "bench/")) for name in names)

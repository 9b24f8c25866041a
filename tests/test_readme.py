"""Every command and snippet in README.md runs as written (ports moved to free ones) and terminates."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest

from bench.processes import free_port, stop, wait_for_port
from tests.test_tap import REPO, twistd_env
from twisted_sesscache.status import SESSION_FILE, watch_commands

README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.S)
SHELL = [line for kind, body in BLOCKS if kind == "sh" for line in body.splitlines() if line.strip()]
PYTHON = [body for kind, body in BLOCKS if kind == "python"]


def command(prefix: str) -> str:
    (line,) = [line for line in SHELL if line.startswith(prefix)]
    return line.split("  #", 1)[0].strip()


def environment() -> dict[str, str]:
    env = twistd_env()
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    return env


def watch(port: int, workdir: Path) -> list[str]:
    """README's two openssl commands against ``port``; what each printed."""
    printed = []
    for line in watch_commands("127.0.0.1", port):
        line = line.replace(SESSION_FILE, str(workdir / "session.pem"))
        done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=30, check=False)
        printed.append(done.stdout.strip())
    return printed


def test_one_watch_recipe_for_readme_make_run_and_the_status_page() -> None:
    assert [line for line in SHELL if "openssl s_client" in line] == watch_commands("127.0.0.1", 8443)
    assert "watch_commands" in (REPO / "scripts" / "run-demo.sh").read_text()


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    """The README's setup lines, run as written in an empty directory."""
    for line in (command("python -m twisted_sesscache.certs"), command("mkdir -p public")):
        subprocess.run(["bash", "-c", line], cwd=tmp_path, env=environment(), timeout=60, check=True)
    assert (tmp_path / "tls" / "cert.pem").exists() and (tmp_path / "public" / "index.html").exists()
    return tmp_path


def serve_and_watch(workdir: Path, argv: list[str], port: int) -> list[str]:
    process = subprocess.Popen(argv, cwd=workdir, env=environment(), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process)
        return watch(port, workdir)
    finally:
        stop(process, timeout=10)


def test_the_python_snippet_serves_and_resumes(prepared: Path) -> None:
    (snippet,) = PYTHON
    port = free_port()
    (prepared / "app.py").write_text(snippet.replace("8443", str(port)))
    printed = serve_and_watch(prepared, [sys.executable, "app.py"], port)
    assert [p.split(",")[0] for p in printed] == ["New", "Reused"], printed


def test_twistd_web_through_the_sesscache_endpoint(prepared: Path) -> None:
    port = free_port()
    line = command("twistd -n web").replace("8443", str(port))
    printed = serve_and_watch(prepared, ["bash", "-c", f"exec {line}"], port)
    assert [p.split(",")[0] for p in printed] == ["New", "Reused"], printed


def test_twistd_sesscache_proxy(prepared: Path) -> None:
    port, backend_port, stats_port = free_port(), free_port(), free_port()
    backend = subprocess.Popen([sys.executable, "-m", "http.server", str(backend_port), "--bind", "127.0.0.1",
                                "--directory", "public"], cwd=prepared, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_for_port(backend_port, backend)
        line = (command("twistd -n sesscache").replace("8443", str(port)).replace("8080", str(backend_port))
                .replace("9100", str(stats_port)))
        line = line.replace("twistd -n sesscache", f"twistd -n sesscache --listen tcp:{port}:interface=127.0.0.1")
        printed = serve_and_watch(prepared, ["bash", "-c", f"exec {line}"], port)
    finally:
        stop(backend, timeout=10)
    assert [p.split(",")[0] for p in printed] == ["New", "Reused"], printed


def test_every_twistd_option_is_in_the_option_reference() -> None:
    from twisted_sesscache.tap import Options

    options = Options()
    # Each row starts with the option's long name, a str (Options' rows are typed as mixed lists).
    names = {cast(str, row[0]) for row in options.optParameters} | {cast(str, row[0]) for row in options.optFlags}
    names |= {name[4:].replace("_", "-") for name in dir(options) if name.startswith("opt_")} - {"help"}
    reference = (REPO / "docs" / "options.md").read_text()
    assert sorted(name for name in names if f"--{name}" not in reference) == []

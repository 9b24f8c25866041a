"""Private keys: passphrase files, encrypted keys that never prompt, files that are not files."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support import TLSFiles
from twisted_sesscache.certs import certificate_options, load_certificate, load_private_key, read_passphrase
from twisted_sesscache.exceptions import CertificateError

PASSPHRASE = b"correct horse"


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory: pytest.TempPathFactory, tls_files: TLSFiles) -> tuple[Path, Path]:
    """The shared test key, encrypted (PKCS#8), and a passphrase file for it."""
    directory = tmp_path_factory.mktemp("encrypted")
    key = serialization.load_pem_private_key(tls_files.private_key.read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    path = directory / "key.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(PASSPHRASE),
        )
    )
    passphrase = directory / "passphrase"
    passphrase.write_bytes(PASSPHRASE + b"\n")
    return path, passphrase


def test_encrypted_key_opens_with_its_passphrase_file(encrypted: tuple[Path, Path], tls_files: TLSFiles) -> None:
    key_path, passphrase = encrypted
    key = load_private_key(key_path, passphrase_file=passphrase)
    assert key.bits() == 2048
    options = certificate_options(tls_files.certificate, key_path, passphrase_file=passphrase)
    assert options.getContext() is not None


def test_encrypted_key_without_passphrase_is_one_clear_error(encrypted: tuple[Path, Path]) -> None:
    with pytest.raises(CertificateError, match="is encrypted: give a file holding its passphrase"):
        load_private_key(encrypted[0])


def test_wrong_passphrase(encrypted: tuple[Path, Path], tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"battery staple\n")
    with pytest.raises(CertificateError, match="does not open with the passphrase in"):
        load_private_key(encrypted[0], passphrase_file=wrong)


def test_passphrase_file_is_its_first_line(tmp_path: Path) -> None:
    path = tmp_path / "p"
    path.write_bytes(b"secret\r\nignored\n")
    assert read_passphrase(path) == b"secret"
    path.write_bytes(b"")
    with pytest.raises(CertificateError, match="is empty"):
        read_passphrase(path)


def test_no_prompt_on_a_terminal(encrypted: tuple[Path, Path]) -> None:
    """With a TTY for stdin and stdout, OpenSSL's default callback would ask for the passphrase."""
    code = (
        "from twisted_sesscache.certs import load_private_key\n"
        "from twisted_sesscache.exceptions import CertificateError\n"
        f"try:\n    load_private_key({str(encrypted[0])!r})\n"
        "except CertificateError as e:\n    print('REFUSED', e, flush=True)\n"
    )
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdin=follower, stdout=follower, stderr=follower,
        cwd=Path(__file__).resolve().parents[1], start_new_session=True,
    )
    os.close(follower)
    output = b""
    try:
        deadline = time.monotonic() + 20
        while process.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    output += os.read(leader, 4096)
                except OSError:
                    break
        assert process.wait(5) == 0, output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(leader)
    assert b"REFUSED" in output and b"pass phrase" not in output.lower(), output


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_key_or_certificate_that_is_not_a_file_is_refused(tmp_path: Path, kind: str) -> None:
    """Never opened: opening a FIFO with no writer would block startup forever."""
    if kind == "fifo":
        path = tmp_path / "key.pem"
        os.mkfifo(path)
    elif kind == "device":
        path = Path("/dev/zero")
    else:
        path = tmp_path
    started = time.monotonic()
    for load in (load_private_key, load_certificate):
        with pytest.raises(CertificateError, match="not a regular file"):
            load(path)
    with pytest.raises(CertificateError, match="passphrase file .* not a regular file"):
        read_passphrase(path)
    assert time.monotonic() - started < 5


# -- the twistd option and the endpoint parameter ---------------------------------------------------


def test_twistd_encrypted_key(encrypted: tuple[Path, Path], tls_files: TLSFiles, tmp_path: Path) -> None:
    from tests.support import free_port, resume_series
    from tests.test_tap import assert_usage_error, run_twistd, twistd

    key, passphrase = encrypted
    common = ("--certificate", str(tls_files.certificate), "--private-key", str(key))
    done = run_twistd("-n", "--pidfile=", "sesscache", "--listen", "tcp:0:interface=127.0.0.1", *common)
    assert_usage_error(done, "--private-key")
    assert "is encrypted" in done.stdout + done.stderr
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    done = run_twistd("-n", "--pidfile=", "sesscache", "--listen", "tcp:0:interface=127.0.0.1", *common,
                      "--private-key-passphrase-file", str(fifo))
    assert_usage_error(done, "--private-key-passphrase-file")
    port = free_port()
    with twistd(tmp_path, "sesscache", "--listen", f"tcp:{port}:interface=127.0.0.1", *common,
                "--private-key-passphrase-file", str(passphrase)) as process:
        process.wait_for(port)
        assert resume_series(port, tmp_path, 2) == ["New", "Reused"]


def test_endpoint_passphrase_file(encrypted: tuple[Path, Path], tls_files: TLSFiles) -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    from tests.test_endpoints import description

    key, passphrase = encrypted
    files = TLSFiles(tls_files.certificate, key)
    with pytest.raises(ValueError, match="^sesscache endpoint: privateKey: .* is encrypted"):
        serverFromString(reactor, description(files))
    assert serverFromString(reactor, description(files, privateKeyPassphraseFile=str(passphrase))) is not None

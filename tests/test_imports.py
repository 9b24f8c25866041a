"""Importing the package does no work: no libssl opened through cffi, no reactor installed.

Twisted's plugin scan imports ``twisted.plugins.sesscache_plugins`` in every
``twistd`` run, and applications import the light modules (modes, the
ClientHello parser, sealing) without wanting OpenSSL looked up or a reactor
chosen for them. Each check runs in a fresh interpreter, since this test
process has long since done both.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

LIGHT = [
    "twisted_sesscache",
    "twisted_sesscache.exceptions",
    "twisted_sesscache.interfaces",
    "twisted_sesscache.modes",
    "twisted_sesscache.sealing",
    "twisted_sesscache.tls.clienthello",
    "twisted_sesscache.tls.session_der",
]
# Import pyOpenSSL (and so Twisted's TLS), but must neither open libssl through cffi nor pick a reactor.
OPENSSL_SIDE = [
    "twisted_sesscache._openssl",
    "twisted_sesscache._openssl.access",
    "twisted_sesscache._openssl.binding",
    "twisted_sesscache._openssl.callbacks",
    "twisted_sesscache._twisted_compat",
    "twisted_sesscache.tls.connection",
    "twisted_sesscache.tap",
    "twisted.plugins.sesscache_plugins",
]

PROBE = """
import importlib, json, sys
for name in [a for a in sys.argv[1:] if not a.startswith("--")]:
    importlib.import_module(name)
binding = sys.modules.get("twisted_sesscache._openssl.binding")
facts = {
    "cffi": "cffi" in sys.modules,
    "pyopenssl": "OpenSSL" in sys.modules,
    "reactor": "twisted.internet.reactor" in sys.modules,
    "looked_up": bool(binding and binding.looked_up()),
}
if "--then-runtime" in sys.argv:
    from twisted_sesscache._openssl import binding, runtime
    facts["runtime"] = runtime().name
    facts["looked_up_after"] = binding.looked_up()
print(json.dumps(facts))
"""


def probe(*modules: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    facts: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return facts


def test_light_modules_load_neither_openssl_nor_the_reactor() -> None:
    facts = probe(*LIGHT)
    assert facts == {"cffi": False, "pyopenssl": False, "reactor": False, "looked_up": False}


@pytest.mark.parametrize("module", OPENSSL_SIDE)
def test_openssl_side_opens_no_libssl_at_import(module: str) -> None:
    facts = probe(module)
    assert (facts["cffi"], facts["reactor"], facts["looked_up"]) == (False, False, False), facts


def test_runtime_opens_libssl_on_first_use() -> None:
    """The control for the tests above: the probe does see the lookup when it happens."""
    facts = probe("twisted_sesscache._openssl", "--then-runtime")
    assert facts["looked_up"] is False
    assert facts["looked_up_after"] is True
    assert facts["runtime"] in ("shared-openssl", "bundled-openssl")

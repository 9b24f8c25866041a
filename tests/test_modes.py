from __future__ import annotations

import pytest
from OpenSSL import SSL

from twisted_sesscache.modes import CacheMode


@pytest.mark.parametrize(
    "text, mode",
    [
        ("off", CacheMode.OFF),
        ("server", CacheMode.SERVER),
        ("both", CacheMode.CLIENT | CacheMode.SERVER),
        ("server,no-auto-clear", CacheMode.SERVER | CacheMode.NO_AUTO_CLEAR),
        ("client, no-internal-store", CacheMode.CLIENT | CacheMode.NO_INTERNAL_STORE),
        ("server,no-internal", CacheMode.SERVER | CacheMode.NO_INTERNAL_LOOKUP | CacheMode.NO_INTERNAL_STORE),
        ("SERVER,No-Internal-Lookup", CacheMode.SERVER | CacheMode.NO_INTERNAL_LOOKUP),
    ],
)
def test_parse(text: str, mode: CacheMode) -> None:
    assert CacheMode.parse(text) == mode
    assert CacheMode.parse(mode.spelled()) == mode


def test_bits_are_openssls() -> None:
    assert CacheMode.SERVER == SSL.SESS_CACHE_SERVER
    assert CacheMode.NO_AUTO_CLEAR == SSL.SESS_CACHE_NO_AUTO_CLEAR
    assert CacheMode.NO_INTERNAL_LOOKUP == SSL.SESS_CACHE_NO_INTERNAL_LOOKUP
    assert CacheMode.NO_INTERNAL_STORE == SSL.SESS_CACHE_NO_INTERNAL_STORE


@pytest.mark.parametrize("text", ["", "servr", "server,no-auto", "no-auto-clear", "server,,"])
def test_unknown_words_are_named(text: str) -> None:
    with pytest.raises(ValueError, match="unknown cache mode"):
        CacheMode.parse(text)


def test_spelling() -> None:
    assert (CacheMode.SERVER | CacheMode.NO_AUTO_CLEAR).spelled() == "server,no-auto-clear"
    assert (CacheMode.SERVER | CacheMode.NO_INTERNAL).spelled() == "server,no-internal"

"""CacheConfig: every rule once, the same message whichever way a setting is spelled."""

from __future__ import annotations

import dataclasses

import pytest
from twisted.internet import reactor
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.python import usage

from tests.support import TLSFiles
from twisted_sesscache import SessionCache
from twisted_sesscache.config import SETTINGS, CacheConfig, Tickets, option_spelling, parameter_spelling
from twisted_sesscache.exceptions import ConfigurationError
from twisted_sesscache.modes import CacheMode
from twisted_sesscache.tap import Options

# (setting, text) pairs every front end must refuse.
BAD = [
    ("mode", "sever"),
    ("mode", "server,bogus"),
    ("size", "-1"),
    ("size", "lots"),
    ("timeout", "0"),
    ("timeout", "5m"),
    ("flush_interval", "-1"),
    ("flush_interval", "nan"),
    ("flush_interval", "inf"),
    ("session_id_context", "x" * 33),
    ("store_timeout", "0"),
    ("ticket_key_rotation", "-3"),
    ("store", "ftp://example"),
]


def python_message(setting: str, text: str) -> str:
    with pytest.raises(ConfigurationError) as raised:
        CacheConfig.from_strings({setting: text})
    assert raised.value.setting == setting
    return raised.value.message


@pytest.mark.parametrize("setting, text", BAD)
def test_cli_endpoint_and_python_say_the_same(tls_files: TLSFiles, setting: str, text: str) -> None:
    message = python_message(setting, text)
    option = option_spelling(setting)
    with pytest.raises(usage.UsageError) as cli:
        Options().parseOptions(["--certificate", str(tls_files.certificate), "--private-key",
                                str(tls_files.private_key), option, text])
    assert str(cli.value) == f"{option}: {message}"
    description = (f"sesscache:0:certificate={quoteStringArgument(str(tls_files.certificate))}"
                   f":{parameter_spelling(setting)}={quoteStringArgument(text)}")
    with pytest.raises(ValueError) as endpoint:
        serverFromString(reactor, description)
    assert str(endpoint.value) == f"sesscache endpoint: {parameter_spelling(setting)}: {message}"


def test_python_keywords_are_checked_by_the_same_rules() -> None:
    with pytest.raises(ConfigurationError) as raised:
        SessionCache(timeout=0)
    assert raised.value.setting == "timeout"
    assert raised.value.message == python_message("timeout", "0")
    with pytest.raises(ConfigurationError) as raised:
        SessionCache(tickets="maybe")
    assert raised.value.setting == "tickets"


def test_every_setting_has_one_row_and_a_default() -> None:
    fields = {f.name for f in dataclasses.fields(CacheConfig)} - {"store_keys"}
    assert {setting.name for setting in SETTINGS} == fields
    assert len({setting.option for setting in SETTINGS}) == len(SETTINGS)
    assert len({setting.parameter for setting in SETTINGS}) == len(SETTINGS)


def test_values_are_normalised() -> None:
    config = CacheConfig(mode="server,no-auto-clear", tickets=True, session_id_context="app")  # type: ignore[arg-type]
    assert config.mode == CacheMode.SERVER | CacheMode.NO_AUTO_CLEAR
    assert config.tickets is Tickets.OWN and config.session_id_context == b"app"
    assert CacheConfig(tickets="shared", store="memory").tickets is Tickets.SHARED  # type: ignore[arg-type]
    assert CacheConfig(flush_interval=5).effective_mode == CacheMode.SERVER | CacheMode.NO_AUTO_CLEAR


@pytest.mark.parametrize(
    "changes, setting",
    [({"tickets": "shared"}, "tickets"), ({"store_key_file": "/tmp/k"}, "store_key_file")],
)
def test_rules_between_settings_name_the_setting(changes: dict[str, object], setting: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        CacheConfig(**changes)  # type: ignore[arg-type]
    assert raised.value.setting == setting and "store" in raised.value.message

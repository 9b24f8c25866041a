"""The proxy's settings, their defaults and rules, and how ``twistd sesscache`` spells them.

Cache settings live in ``config.py``; these are the listener's and the
relay's: how long a handshake may take, how long a proxied connection may
be idle, how long SIGTERM waits, what goes to the backend first. A bad value
is a ``ConfigurationError`` naming the setting, so twistd blames the option.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted_sesscache.exceptions import ConfigurationError

HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 600.0
SHUTDOWN_TIMEOUT = 10.0
MAX_EARLY_DATA = 64 * 1024
PROXY_PROTOCOL_VERSIONS = ("v1", "v2")


@dataclass(frozen=True)
class ProxySettings:
    """What ``ProxyFactory`` takes besides the upstream: checked when built."""

    handshake_timeout: float | None = HANDSHAKE_TIMEOUT
    idle_timeout: float | None = IDLE_TIMEOUT
    shutdown_timeout: float = SHUTDOWN_TIMEOUT
    max_early_data: int = MAX_EARLY_DATA
    upstream_proxy_protocol: str | None = None

    def __post_init__(self) -> None:
        for name in ("handshake_timeout", "idle_timeout", "shutdown_timeout"):
            value = getattr(self, name)
            if value is None and name != "shutdown_timeout":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ConfigurationError(name, f"must be a positive number of seconds, not {value!r}")
        if isinstance(self.max_early_data, bool) or not isinstance(self.max_early_data, int) or self.max_early_data < 0:
            raise ConfigurationError("max_early_data", f"must be 0 or more bytes, not {self.max_early_data!r}")
        if self.upstream_proxy_protocol is not None and self.upstream_proxy_protocol not in PROXY_PROTOCOL_VERSIONS:
            raise ConfigurationError("upstream_proxy_protocol", f"must be one of {', '.join(PROXY_PROTOCOL_VERSIONS)}, "
                                     f"not {self.upstream_proxy_protocol!r}")

    @classmethod
    def from_strings(cls, given: Mapping[str, str | None]) -> ProxySettings:
        """From what a user typed, keyed by setting name; None: not given."""
        values: dict[str, Any] = {}
        for name, text in given.items():
            if text is None:
                continue
            if name == "upstream_proxy_protocol":
                values[name] = text.strip().lower()
                continue
            try:
                values[name] = int(text) if name == "max_early_data" else float(text)
            except ValueError:
                raise ConfigurationError(name, f"must be a number, not {text!r}") from None
        return cls(**values)

    def arguments(self) -> dict[str, Any]:
        """As ``ProxyFactory`` keyword arguments."""
        return dataclasses.asdict(self)


# (setting, twistd option, help); the default is shown from ProxySettings.
OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("handshake_timeout", "handshake-timeout",
     "Seconds a client has to complete its TLS handshake before it is dropped (counted as a handshake timeout)."),
    ("idle_timeout", "idle-timeout",
     "With --upstream: seconds a proxied connection may be idle both ways before both legs are closed."),
    ("shutdown_timeout", "shutdown-timeout",
     "With --upstream: seconds proxied connections get to finish after SIGTERM; then they are cut "
     "(without close_notify)."),
    ("upstream_proxy_protocol", "upstream-proxy-protocol",
     "With --upstream: send the client's address to the backend first, as HAProxy's PROXY protocol v1 or v2."),
)


def option_rows() -> list[list[Any]]:
    """``usage.Options.optParameters`` rows (default None, so "not given" stays None)."""
    defaults = {field.name: field.default for field in dataclasses.fields(ProxySettings)}
    rows = []
    for name, option, text in OPTIONS:
        default = defaults[name]
        rows.append([option, None, None, text + (f" [default: {default:g}]" if default is not None else "")])
    return rows


__all__ = ["HANDSHAKE_TIMEOUT", "IDLE_TIMEOUT", "MAX_EARLY_DATA", "OPTIONS", "PROXY_PROTOCOL_VERSIONS",
           "SHUTDOWN_TIMEOUT", "ProxySettings", "option_rows"]

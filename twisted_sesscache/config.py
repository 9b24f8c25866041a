"""Every session-cache setting, its default and its rules, in one place.

``CacheConfig`` is what a :class:`~twisted_sesscache.cache.SessionCache` is
made from. The Python API builds it from keyword arguments, ``twistd
sesscache`` from its options and the ``sesscache:`` endpoint from its
parameters; the last two go through :data:`SETTINGS`, the one spelling table,
so a bad value is refused with the same message everywhere, led by the
setting's name as the user spelled it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from twisted_sesscache.exceptions import ConfigurationError, NeedsSharedOpenSSL
from twisted_sesscache.modes import CacheMode

if TYPE_CHECKING:
    from twisted_sesscache._openssl import OpenSSLAccess
    from twisted_sesscache.interfaces import ISessionStore

SESSION_ID_CONTEXT_MAX = 32  # SSL_MAX_SID_CTX_LENGTH
DEFAULT_SIZE = 20480  # SSL_SESSION_CACHE_MAX_SIZE_DEFAULT: what "no size given" means to OpenSSL
DEFAULT_TIMEOUT = 300  # seconds a session lives, server and client side
# The reactor flushes every this many seconds under the shared runtime unless told otherwise: OpenSSL's
# own flush (every 255 sessions, inside a handshake) stalls 48 ms at 100,000 sessions; the sliced
# flush's worst turn is 1.1 ms (docs/benchmarks.md). The bundled runtime cannot flush: 0 there.
SHARED_FLUSH_INTERVAL = 10.0
STORE_SCHEMES = ("memory", "lmdb", "redis", "rediss", "redis+sentinel", "rediss+sentinel")
Spelling = Callable[[str], str]


class Tickets(enum.Enum):
    """Stateless session tickets: off (TLS 1.3 tickets are then stateful), own keys, or shared keys."""

    OFF = "no"
    OWN = "yes"
    SHARED = "shared"

    @classmethod
    def of(cls, value: object) -> Tickets:
        """From the Python API's True/False/"shared" or a user's yes/no/shared."""
        if isinstance(value, Tickets):
            return value
        if value is True or value is False:
            return cls.OWN if value else cls.OFF
        if isinstance(value, str):
            word = value.strip().lower()
            if word == "shared":
                return cls.SHARED
            if word in _YES or word in _NO:
                return cls.OWN if word in _YES else cls.OFF
        raise ConfigurationError("tickets", f"must be yes, no or shared, not {value!r}")

    def __bool__(self) -> bool:
        return self is not Tickets.OFF


_YES = ("yes", "true", "on", "1")
_NO = ("no", "false", "off", "0")


@dataclass(frozen=True)
class CacheConfig:
    """The settings of one session cache; invalid combinations never get built."""

    mode: CacheMode = CacheMode.SERVER
    size: int | None = None
    """Most sessions OpenSSL keeps; None: OpenSSL's default (20480); 0: no limit."""
    timeout: int = DEFAULT_TIMEOUT
    flush_interval: float | None = None
    """Seconds between reactor-driven flushes; 0 leaves it to OpenSSL's automatic flush;
    None: the runtime's default (:func:`default_flush_interval`), settled by :meth:`for_runtime`."""
    session_id_context: bytes | None = None
    tickets: Tickets = Tickets.OFF
    ticket_key_rotation: float = 3600.0
    keep_sessions_on_truncation: bool = True
    store: str | ISessionStore | None = None
    """A store URL (``memory``, ``redis://...``) or an object providing ISessionStore."""
    store_key_file: str | None = None
    store_ca: str | None = None
    """With rediss://: the CA certificates (PEM file) Redis's certificate is verified against."""
    store_keys: tuple[bytes, ...] | None = field(default=None, repr=False)
    store_timeout: float = 0.05

    def __post_init__(self) -> None:
        normal = {
            "mode": _mode(self.mode),
            "tickets": Tickets.of(self.tickets),
            "session_id_context": _session_id_context(self.session_id_context),
            "store_keys": tuple(self.store_keys) if self.store_keys is not None else None,
        }
        for name, value in normal.items():
            object.__setattr__(self, name, value)
        self._check()

    def _check(self) -> None:
        if self.size is not None and (not isinstance(self.size, int) or self.size < 0):
            raise ConfigurationError("size", f"must be 0 (no limit) or more, not {self.size!r}")
        if not isinstance(self.timeout, int) or self.timeout <= 0:
            raise ConfigurationError("timeout", f"must be a positive whole number of seconds, not {self.timeout!r}")
        if self.flush_interval is not None:
            _check_seconds("flush_interval", self.flush_interval, positive=False)
        _check_seconds("ticket_key_rotation", self.ticket_key_rotation, positive=True)
        _check_seconds("store_timeout", self.store_timeout, positive=True)
        if isinstance(self.store, str):
            _check_store_url(self.store)
        if self.store is None and self.store_key_file is not None:
            raise ConfigurationError("store_key_file", "needs a store (store)")
        if self.store_ca is not None and not (isinstance(self.store, str) and self.store.startswith("rediss")):
            raise ConfigurationError("store_ca", "needs a TLS Redis store (store=rediss://...)")
        if self.tickets is Tickets.SHARED and self.store is None:
            raise ConfigurationError("tickets", "shared ticket keys need a store (store)")

    @property
    def effective_mode(self) -> CacheMode:
        """The mode given to OpenSSL: the reactor flushes, so OpenSSL's own flush every 255 sessions is off."""
        return self.mode | CacheMode.NO_AUTO_CLEAR if self.flush_interval else self.mode

    @property
    def size_limit(self) -> int:
        return DEFAULT_SIZE if self.size is None else self.size

    def replace(self, **changes: Any) -> CacheConfig:
        return dataclasses.replace(self, **changes)

    def for_runtime(self, runtime: OpenSSLAccess) -> CacheConfig:
        """This configuration checked against ``runtime``, with the runtime's defaults filled in."""
        self.check_runtime(runtime)
        if self.flush_interval is None:
            return self.replace(flush_interval=default_flush_interval(runtime))
        return self

    def check_runtime(self, runtime: OpenSSLAccess) -> None:
        """Refuse, naming the setting, what this process's OpenSSL cannot do."""
        if runtime.shared:
            return
        needs = [
            ("size", self.size is not None, "A session cache size limit"),
            ("flush_interval", bool(self.flush_interval), "A scheduled flush of expired sessions"),
            ("tickets", self.tickets is Tickets.SHARED, "Shared TLS ticket keys"),
        ]
        for setting, used, operation in needs:
            if used:
                raise NeedsSharedOpenSSL(operation, runtime.version, setting=setting)

    @classmethod
    def from_strings(cls, given: Mapping[str, object]) -> CacheConfig:
        """From what a user typed, keyed by setting name; None: not given.

        Strings are parsed by the setting's row of :data:`SETTINGS`; values of
        other types (a twistd flag's bool) are taken as they are. Errors name
        the setting.
        """
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            value = given.get(setting.name)
            if isinstance(value, str):
                value = parse_as(setting.name, setting.parse, value)
            if value is not None:
                values[setting.name] = value
        return cls(**values)


def default_flush_interval(runtime: OpenSSLAccess) -> float:
    """The flush interval when none is given: the reactor flushes in slices where it can."""
    return SHARED_FLUSH_INTERVAL if runtime.shared else 0.0


def _mode(value: object) -> CacheMode:
    if isinstance(value, str):
        try:
            return CacheMode.parse(value)
        except ValueError as error:
            raise ConfigurationError("mode", str(error)) from None
    if not isinstance(value, int):
        raise ConfigurationError("mode", f"must be a CacheMode, not {value!r}")
    return CacheMode(value)


def _session_id_context(value: object) -> bytes | None:
    if value is None:
        return None
    raw = value.encode("utf-8") if isinstance(value, str) else value
    if not isinstance(raw, bytes) or not 0 < len(raw) <= SESSION_ID_CONTEXT_MAX:
        raise ConfigurationError("session_id_context", f"must be 1 to {SESSION_ID_CONTEXT_MAX} bytes long")
    return raw


def _check_seconds(setting: str, value: object, *, positive: bool) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 <= value < float("inf")  # also refuses NaN
        or (positive and value == 0)
    ):
        raise ConfigurationError(
            setting, f"must be {'a' if positive else '0 or a'} positive number of seconds, not {value!r}"
        )


def _check_store_url(url: str) -> None:
    scheme = "memory" if url == "memory" else urlsplit(url).scheme.lower()
    if scheme not in STORE_SCHEMES:
        raise ConfigurationError(
            "store", f"unknown store {url!r}: expected 'memory', lmdb:DIRECTORY or redis://host:port/db"
        )


# -- parsing user strings -----------------------------------------------------------------


def integer(text: str) -> int:
    """``text`` as a whole number (range rules are CacheConfig's)."""
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ConfigurationError(None, f"must be a whole number, not {text!r}") from None


def whole_number(text: str, minimum: int = 0) -> int:
    """``text`` as a whole number of at least ``minimum``, for listener settings."""
    value = integer(text)
    if value < minimum:
        raise ConfigurationError(None, f"must be {minimum} or more, not {value}")
    return value


def seconds(text: str) -> float:
    """A number of seconds (range rules are CacheConfig's)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ConfigurationError(None, f"must be a number of seconds, not {text!r}") from None


def yes_no(text: str) -> bool:
    word = text.strip().lower()
    if word not in _YES and word not in _NO:
        raise ConfigurationError(None, f"must be yes or no, not {text!r}")
    return word in _YES


def parse_as(name: str, parse: Callable[[str], object], text: str) -> Any:
    """``parse(text)``, with any ConfigurationError blamed on the setting ``name``."""
    try:
        return parse(text)
    except ConfigurationError as error:
        raise ConfigurationError(name, error.message) from None


@dataclass(frozen=True)
class Setting:
    """One setting's spellings: the CacheConfig field, the twistd option, the endpoint parameter."""

    name: str
    option: str
    parameter: str
    parse: Callable[[str], object]
    help: str

    @property
    def default(self) -> object:
        return {f.name: f.default for f in dataclasses.fields(CacheConfig)}[self.name]


def _text(text: str) -> str:
    return text


SETTINGS: tuple[Setting, ...] = (
    Setting("mode", "session-cache-mode", "mode", _mode,
            "off, client, server or both, optionally followed by modifiers joined with commas: "
            "no-auto-clear, no-internal-lookup, no-internal-store, no-internal, update-time "
            "(example: server,no-auto-clear)."),
    Setting("size", "session-cache-size", "size", integer,
            "Most sessions kept; 0 means no limit [default: OpenSSL's 20480]. "
            "Needs the shared-OpenSSL runtime."),
    Setting("timeout", "session-timeout", "timeout", integer,
            "Session lifetime in seconds."),
    Setting("flush_interval", "flush-interval", "flushInterval", seconds,
            "Flush expired sessions every this many seconds from the reactor, in slices (implies "
            "no-auto-clear); 0 leaves it to OpenSSL's automatic clear every 255 sessions, which stalls a "
            f"handshake [default: {SHARED_FLUSH_INTERVAL:g} under the shared-OpenSSL runtime; 0 under PyPI "
            "wheels, which cannot flush]."),
    Setting("session_id_context", "session-id-context", "sessionIdContext", _text,
            f"Sessions resume only between listeners sharing this text (1 to {SESSION_ID_CONTEXT_MAX} "
            "bytes) [default: derived from the certificate and the verification settings]."),
    Setting("tickets", "tickets", "tickets", Tickets.of,
            "yes: stateless tickets with this process's own keys; shared: keys shared through the store; "
            "no: TLS 1.3 gets stateful tickets kept in the cache."),
    Setting("keep_sessions_on_truncation", "strict-truncation", "keepSessionsOnTruncation", yes_no,
            "Whether clients closing without close_notify keep their sessions (still reported as unclean)."),
    Setting("store", "store", "store", _text,
            "Share sessions through a store: memory, lmdb:DIRECTORY (the processes of one host), or "
            "redis://[user:password@]host:port/db (rediss:// for TLS to Redis). Server-side sharing needs the shared-OpenSSL runtime."),
    Setting("store_key_file", "store-key-file", "storeKeyFile", _text,
            "File with the 32-byte key that seals what goes to the store; created with mode 0600 when "
            "absent. Every process sharing the store needs the same file."),
    Setting("store_ca", "store-ca", "storeCa", _text,
            "With a rediss:// store: PEM file of the CA certificates Redis's certificate is verified "
            "against (its name is checked too) [default: the platform's trust store]."),
    Setting("store_timeout", "store-timeout", "storeTimeout", seconds,
            "Seconds a store lookup may take before the handshake goes on without it (a full handshake)."),
    Setting("ticket_key_rotation", "ticket-key-rotation", "ticketKeyRotation", seconds,
            "With shared tickets: seconds between ticket key rotations; older keys still open tickets "
            "for one session timeout."),
)
BY_NAME = {setting.name: setting for setting in SETTINGS}


def option_spelling(name: str) -> str:
    """How ``twistd sesscache`` spells a setting (``--session-timeout``); other names as they are."""
    setting = BY_NAME.get(name)
    return f"--{setting.option}" if setting is not None else f"--{name.replace('_', '-')}"


def parameter_spelling(name: str) -> str:
    """How the ``sesscache:`` endpoint spells a setting (``flushInterval``)."""
    setting = BY_NAME.get(name)
    if setting is not None:
        return setting.parameter
    head, *rest = name.split("_")
    return head + "".join(word.capitalize() for word in rest)


__all__ = [
    "BY_NAME",
    "DEFAULT_SIZE",
    "DEFAULT_TIMEOUT",
    "SHARED_FLUSH_INTERVAL",
    "SESSION_ID_CONTEXT_MAX",
    "SETTINGS",
    "CacheConfig",
    "Setting",
    "Spelling",
    "Tickets",
    "default_flush_interval",
    "option_spelling",
    "parameter_spelling",
    "parse_as",
    "integer",
    "seconds",
    "whole_number",
    "yes_no",
]

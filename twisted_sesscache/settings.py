"""From the strings a user types to a SessionCache and CertificateOptions.

``twistd sesscache`` options and ``sesscache:`` endpoint parameters name the
same settings differently (``--session-cache-size`` and ``size``). Both go
through here, each with its own spelling, so that a bad value is reported
under the name the user typed and every rule lives in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from OpenSSL import SSL

from twisted_sesscache.cache import DEFAULT_TIMEOUT, SESSION_ID_CONTEXT_MAX, SessionCache
from twisted_sesscache.modes import CacheMode
from twisted_sesscache._openssl.access import NeedsSharedOpenSSL

# Setting names, as SessionCache calls them; values are strings or None (not given).
SETTINGS = (
    "mode",
    "size",
    "timeout",
    "flush_interval",
    "session_id_context",
    "tickets",
    "keep_sessions_on_truncation",
    "store",
    "store_key_file",
    "store_timeout",
    "ticket_key_rotation",
)
Spelling = Callable[[str], str]


def whole_number(text: str, name: str, minimum: int = 0) -> int:
    """``text`` as an integer of at least ``minimum``; ValueError naming ``name`` otherwise."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, not {text!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be {minimum} or more, not {value}")
    return value


def seconds(text: str, name: str, *, positive: bool = False) -> float:
    """A number of seconds: at least 0, or more than 0 with ``positive``."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds, not {text!r}") from None
    if not value >= 0 or value == float("inf") or (positive and value == 0):  # also refuses NaN
        raise ValueError(f"{name} must be {'a' if positive else '0 or a'} positive number of seconds, not {text!r}")
    return value


def yes_no(text: str, name: str) -> bool:
    words = {"yes": True, "true": True, "on": True, "1": True, "no": False, "false": False, "off": False, "0": False}
    try:
        return words[text.strip().lower()]
    except KeyError:
        raise ValueError(f"{name} must be yes or no, not {text!r}") from None


def tickets_setting(text: str, name: str) -> bool | str:
    """yes, no, or shared (ticket keys from the store)."""
    if text.strip().lower() == "shared":
        return "shared"
    try:
        return yes_no(text, name)
    except ValueError:
        raise ValueError(f"{name} must be yes, no or shared, not {text!r}") from None


def cache_from_strings(given: Mapping[str, str | None], spell: Spelling) -> SessionCache:
    """A SessionCache from user strings; ValueError whose message starts with the setting's spelling."""

    def value(setting: str, default: str | None = None) -> str | None:
        text = given.get(setting)
        return default if text is None else text

    try:
        mode = CacheMode.parse(value("mode", "server") or "")
    except ValueError as error:
        raise ValueError(f"{spell('mode')}: {error}") from None
    size_text = value("size")
    size = whole_number(size_text, spell("size")) if size_text is not None else None
    timeout = whole_number(value("timeout", str(DEFAULT_TIMEOUT)) or "", spell("timeout"), minimum=1)
    flush_interval = seconds(value("flush_interval", "0") or "", spell("flush_interval"))
    context = value("session_id_context")
    if context is not None and not 0 < len(context.encode("utf-8")) <= SESSION_ID_CONTEXT_MAX:
        raise ValueError(f"{spell('session_id_context')} must be 1 to {SESSION_ID_CONTEXT_MAX} bytes long")
    tickets = tickets_setting(value("tickets", "no") or "", spell("tickets"))
    keep = yes_no(value("keep_sessions_on_truncation", "yes") or "", spell("keep_sessions_on_truncation"))
    store_timeout = seconds(value("store_timeout", "0.05") or "", spell("store_timeout"), positive=True)
    rotation = seconds(value("ticket_key_rotation", "3600") or "", spell("ticket_key_rotation"), positive=True)
    store, keys = _store(value("store"), value("store_key_file"), spell)
    try:
        return SessionCache(
            mode,
            size=size,
            timeout=timeout,
            flush_interval=flush_interval,
            session_id_context=context,
            tickets=tickets,
            ticket_key_rotation=rotation,
            keep_sessions_on_truncation=keep,
            store=store,
            store_keys=keys,
            store_timeout=store_timeout,
        )
    except NeedsSharedOpenSSL as error:
        culprit = "size" if size is not None else "flush_interval" if flush_interval else "tickets"
        raise ValueError(f"{spell(culprit)}: {error}") from None
    except ValueError as error:
        culprit = "store_key_file" if "sealing key" in str(error) else "tickets" if "ticket" in str(error) else "store"
        raise ValueError(f"{spell(culprit)}: {error}") from None


def _store(url: str | None, key_file: str | None, spell: Spelling) -> tuple[Any, list[bytes] | None]:
    from twisted_sesscache.sealing import KeyFileError, load_or_create_key_file
    from twisted_sesscache.stores import store_from_url

    if url is None:
        if key_file is not None:
            raise ValueError(f"{spell('store_key_file')} needs {spell('store')}")
        return None, None
    try:
        store = store_from_url(url)
    except ValueError as error:
        raise ValueError(f"{spell('store')}: {error}") from None
    if key_file is None:
        return store, None
    try:
        return store, [load_or_create_key_file(key_file)]
    except KeyFileError as error:
        raise ValueError(f"{spell('store_key_file')}: {error}") from None


def certificate_from_strings(
    certificate: str, private_key: str | None, spell: Spelling, **options: Any
) -> Any:
    """CertificateOptions from PEM files, each failure blamed on the setting that named the file."""
    from twisted_sesscache.certs import CertificateError, certificate_options, load_certificate, load_private_key

    key_name = spell("private_key") if private_key else spell("certificate")
    try:
        load_certificate(certificate)
    except CertificateError as error:
        raise ValueError(f"{spell('certificate')}: {error}") from None
    try:
        load_private_key(private_key if private_key is not None else certificate)
    except CertificateError as error:
        raise ValueError(f"{key_name}: {error}") from None
    try:
        return certificate_options(certificate, private_key, **options)
    except (CertificateError, SSL.Error):
        raise ValueError(
            f"{key_name}: private key {private_key or certificate!r} does not match certificate {certificate!r}"
        ) from None


def spelling(names: Mapping[str, str], prefix: str = "") -> Spelling:
    """A Spelling from a table of the names that differ; others are used as they are."""
    return lambda setting: prefix + names.get(setting, setting)

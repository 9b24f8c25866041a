"""Session cache modes as OpenSSL defines them, and their command-line spelling."""

from __future__ import annotations

import enum


class CacheMode(enum.IntFlag):
    """The ``SSL_SESS_CACHE_*`` bits of SSL_CTX_set_session_cache_mode(3)."""

    OFF = 0x0
    CLIENT = 0x1
    SERVER = 0x2
    BOTH = 0x3
    NO_AUTO_CLEAR = 0x80
    NO_INTERNAL_LOOKUP = 0x100
    NO_INTERNAL_STORE = 0x200
    NO_INTERNAL = 0x300
    UPDATE_TIME = 0x400

    @classmethod
    def parse(cls, text: str) -> CacheMode:
        """Parse ``"server,no-auto-clear"``: one base word, then modifiers."""
        words = [w.strip().lower() for w in text.split(",")]
        if not words or words[0] not in _BASES:
            raise ValueError(
                f"unknown cache mode {words[0]!r}: expected one of "
                f"{', '.join(_BASES)}, optionally followed by "
                f"modifiers ({', '.join(_MODIFIERS)}) joined with commas"
            )
        mode = _BASES[words[0]]
        for word in words[1:]:
            if word not in _MODIFIERS:
                raise ValueError(
                    f"unknown cache mode modifier {word!r}: expected "
                    f"{', '.join(_MODIFIERS)}"
                )
            mode |= _MODIFIERS[word]
        return cls(mode)

    def spelled(self) -> str:
        """The option spelling that :meth:`parse` reads back to this mode."""
        words = [_BASE_NAMES[self & CacheMode.BOTH]]
        rest = self & ~CacheMode.BOTH
        if rest & CacheMode.NO_INTERNAL == CacheMode.NO_INTERNAL:
            words.append("no-internal")
            rest &= ~CacheMode.NO_INTERNAL
        words += [name for name, bit in _MODIFIERS.items() if bit != CacheMode.NO_INTERNAL and rest & bit]
        return ",".join(words)


_BASES: dict[str, CacheMode] = {
    "off": CacheMode.OFF,
    "client": CacheMode.CLIENT,
    "server": CacheMode.SERVER,
    "both": CacheMode.BOTH,
}
_BASE_NAMES = {bit: name for name, bit in _BASES.items()}
_MODIFIERS: dict[str, CacheMode] = {
    "no-auto-clear": CacheMode.NO_AUTO_CLEAR,
    "no-internal-lookup": CacheMode.NO_INTERNAL_LOOKUP,
    "no-internal-store": CacheMode.NO_INTERNAL_STORE,
    "no-internal": CacheMode.NO_INTERNAL,
    "update-time": CacheMode.UPDATE_TIME,
}

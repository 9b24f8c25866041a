"""What the client side did to each ``SSL.Context`` it prepared, kept beside the context, not on it.

pyOpenSSL's objects are not ours to decorate: the state lives in a weak
mapping, so it goes when the context does and never collides with another
library's attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from weakref import WeakKeyDictionary

from OpenSSL import SSL


@dataclass(frozen=True)
class ClientContextState:
    """One context, as :meth:`ClientSessionCache.prepare_context` left it."""

    prepared: bool
    """Client cache mode, timeout and our session-ID context are set; False: pyOpenSSL refused
    (the context had made a connection already), and its connections neither offer nor learn."""
    versions: int = 0
    """The context's protocol-version option bits (``key.VERSION_OPTIONS``), part of the key."""
    callbacks: bool = False
    """The new-session callback is installed (shared runtime): it, not polling, learns sessions."""


_states: WeakKeyDictionary[SSL.Context, ClientContextState] = WeakKeyDictionary()


def state_of(context: SSL.Context) -> ClientContextState | None:
    """What was done to ``context``, or None when it was never seen."""
    return _states.get(context)


def record(context: SSL.Context, state: ClientContextState) -> None:
    _states[context] = state


__all__ = ["ClientContextState", "record", "state_of"]

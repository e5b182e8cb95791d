"""Browser sessions for the pages the daemon serves (the dashboard).

A browser cannot send the RPC cookie as a header for a page it navigates to, and the
cookie must never sit in a URL that outlives one use. So an authenticated caller mints
a one-time login token (``vcoin dashboard``); the first GET of the page with
``?token=...`` spends it and sets an HttpOnly, SameSite=Strict session cookie that then
authorises the page's own same-origin calls. Everything lives in memory: a restart ends
every session.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable

TOKEN_TTL_S = 3600.0  # an unused login link expires after an hour
SESSION_TTL_S = 12 * 3600.0
MAX_TOKENS = 32  # beyond these the oldest unused token (or session) is forgotten
MAX_SESSIONS = 32


def _key(secret: str) -> str:
    # Only digests are kept, so a memory dump or a timing probe learns no live secret.
    return hashlib.sha256(secret.encode()).hexdigest()


class Sessions:
    """One-time login tokens and the sessions they open."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens: dict[str, float] = {}  # digest -> expiry, oldest first
        self._sessions: dict[str, float] = {}

    def mint_token(self) -> str:
        """A fresh login token, valid once within TOKEN_TTL_S."""
        now = self._expire()
        _trim(self._tokens, MAX_TOKENS - 1)
        token = secrets.token_urlsafe(32)
        self._tokens[_key(token)] = now + TOKEN_TTL_S
        return token

    def redeem(self, token: str) -> str | None:
        """Spend ``token``: a new session id, or None when it is unknown, used or expired."""
        now = self._expire()
        if self._tokens.pop(_key(token), None) is None:
            return None
        _trim(self._sessions, MAX_SESSIONS - 1)
        session = secrets.token_urlsafe(32)
        self._sessions[_key(session)] = now + SESSION_TTL_S
        return session

    def valid(self, session: str) -> bool:
        expiry = self._sessions.get(_key(session))
        return expiry is not None and expiry > self._clock()

    def _expire(self) -> float:
        now = self._clock()
        for table in (self._tokens, self._sessions):
            for key in [k for k, expiry in table.items() if expiry <= now]:
                del table[key]
        return now


def _trim(table: dict[str, float], keep: int) -> None:
    while len(table) > keep:
        del table[next(iter(table))]

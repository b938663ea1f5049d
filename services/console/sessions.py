"""The console's sign-in sessions: a random session id in a signed, HttpOnly, SameSite=Strict cookie, and a
CSRF token per session that every state-changing form must send back.

Sessions live in the API process's memory (``SessionStore``): the key a person signed in with is kept there,
never in the cookie, and is checked again on every page, so a revoked key ends its sessions at once. A restart
signs everyone out; behind several API replicas, pin a browser to one replica (sticky sessions). The cookie's
value is ``<id>.<hmac>``: HMAC-SHA256 of the id under a secret made at start (``secrets.token_bytes``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

#: the session cookie, and the sign-in form's own token cookie (a CSRF token before there is a session)
SESSION_COOKIE = "lorafleet_console"
SIGN_IN_COOKIE = "lorafleet_console_sign_in"
#: a session ends this long after sign-in
SESSION_SECONDS = 8 * 3600.0
#: sessions kept at most (the oldest are dropped first), so sign-ins cannot grow the process without bound
MAX_SESSIONS = 10_000


@dataclass(frozen=True)
class ConsoleSession:
    """A signed-in browser: a tenant's key (``api_key``) or the admin key (``admin``), and its CSRF token."""

    id: str
    csrf_token: str
    expires_at: float
    api_key: str | None = None
    admin: bool = False


@dataclass
class SessionStore:
    """Sessions by id, in memory; ``clock`` is a wall clock in seconds (a test may move it)."""

    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    ttl_seconds: float = SESSION_SECONDS
    clock: Callable[[], float] = time.time
    _sessions: dict[str, ConsoleSession] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def sign(self, value: str) -> str:
        """``value.<mac>``: what a cookie holds."""
        mac = hmac.new(self.secret, value.encode("ascii"), hashlib.sha256).hexdigest()
        return f"{value}.{mac}"

    def unsign(self, signed: str | None) -> str | None:
        """The value of a signed cookie, or None when it is missing, malformed or not signed by this store."""
        if not signed or signed.count(".") != 1:
            return None
        value, _mac = signed.split(".")
        try:
            expected = self.sign(value)
        except UnicodeEncodeError:
            return None
        return value if hmac.compare_digest(expected, signed) else None

    def create(self, *, api_key: str | None, admin: bool) -> ConsoleSession:
        """A new session (its cookie value is ``sign(session.id)``)."""
        now = self.clock()
        session = ConsoleSession(
            id=secrets.token_urlsafe(24),
            csrf_token=secrets.token_urlsafe(24),
            expires_at=now + self.ttl_seconds,
            api_key=api_key,
            admin=admin,
        )
        with self._lock:
            self._drop_expired(now)
            while len(self._sessions) >= MAX_SESSIONS:
                self._sessions.pop(next(iter(self._sessions)))
            self._sessions[session.id] = session
        return session

    def find(self, cookie: str | None) -> ConsoleSession | None:
        """The live session a cookie names, or None (no cookie, a forged or stale one, or an expired session)."""
        session_id = self.unsign(cookie)
        if session_id is None:
            return None
        with self._lock:
            found = self._sessions.get(session_id)
            if found is not None and found.expires_at <= self.clock():
                del self._sessions[session_id]
                return None
            return found

    def end(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def _drop_expired(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if s.expires_at <= now]:
            del self._sessions[key]


def tokens_match(expected: str, given: str | None) -> bool:
    """A CSRF check in constant time (a missing token never matches)."""
    return bool(given) and hmac.compare_digest(expected.encode(), str(given).encode())


__all__ = [
    "ConsoleSession",
    "MAX_SESSIONS",
    "SESSION_COOKIE",
    "SESSION_SECONDS",
    "SIGN_IN_COOKIE",
    "SessionStore",
    "tokens_match",
]

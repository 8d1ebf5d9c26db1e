"""Who is calling: passwords (Argon2id), session JWTs in cookies with CSRF double-submit, login
rate limiting, and API keys for ``/v1/*``.

Session: an HS256 JWT (algorithm pinned on decode) in the HttpOnly, SameSite=Strict cookie
``llmtree_session``, carrying the user id (``sub``), the user's ``token_version`` (``ver``; bumped
by logout and password change, which ends every older session) and a random ``csrf`` value that is
also set in the readable cookie ``llmtree_csrf``; a cookie-authenticated change must echo it in
``X-CSRF-Token``. API keys: ``llmt-`` + 43 random characters; only their SHA-256 and a display
prefix are stored.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
from collections import deque
from datetime import timedelta
from typing import Any

import anyio
import jwt
from fastapi import Request, Response
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher
from sqlalchemy import select, update

from llmtree.config import Settings
from llmtree.errors import ConfigError
from llmtree.gateway.apierror import ApiError, not_authenticated
from llmtree.gateway.db import Database
from llmtree.gateway.db.models import ApiKey, User, utcnow

logger = logging.getLogger(__name__)

SESSION_COOKIE = "llmtree_session"
CSRF_COOKIE = "llmtree_csrf"
CSRF_HEADER = "X-CSRF-Token"
ALGORITHM = "HS256"
MIN_SECRET_CHARS = 32
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
KEY_PREFIX = "llmt-"
KEY_USED_EVERY_S = 60.0
"""``last_used_at`` is written at most this often per key."""

LOGIN_FAILURES = 5
LOGIN_WINDOW_S = 60.0

_hasher = PasswordHash((Argon2Hasher(),))
_DUMMY_HASH = _hasher.hash("not a real password; evens out the time of unknown users")


def session_secret(settings: Settings) -> str:
    """The JWT signing key; ConfigError unless it is long enough or dev mode makes one up."""
    secret = settings.jwt_secret.strip()
    if len(secret) >= MIN_SECRET_CHARS:
        return secret
    if settings.dev:
        logger.warning("dev mode: sessions signed with a throwaway key (they end on restart)")
        return secrets.token_urlsafe(48)
    what = "is not set" if not secret else f"has {len(secret)} characters"
    raise ConfigError(
        f"LLMTREE_JWT_SECRET {what}; set it to {MIN_SECRET_CHARS}+ random characters "
        "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`) or run with "
        "LLMTREE_DEV=1 for a throwaway one"
    )


async def hash_password(password: str) -> str:
    return await anyio.to_thread.run_sync(_hasher.hash, password)


async def verify_password(password: str, hashed: str | None) -> bool:
    def check() -> bool:
        try:
            return bool(_hasher.verify(password, hashed or _DUMMY_HASH)) and hashed is not None
        except Exception:  # noqa: BLE001 - a malformed stored hash is a failed login
            return False

    return await anyio.to_thread.run_sync(check)


def new_api_key() -> tuple[str, str, str]:
    """(secret, display prefix, sha256 hex) of a fresh API key."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    return secret, secret[: len(KEY_PREFIX) + 4], key_hash(secret)


def key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()


class LoginLimiter:
    """At most ``LOGIN_FAILURES`` failed logins per (username, client address) per window."""

    def __init__(self, failures: int = LOGIN_FAILURES, window_s: float = LOGIN_WINDOW_S) -> None:
        self.failures, self.window_s = failures, window_s
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], deque[float]] = {}

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        times = self._seen.setdefault(key, deque())
        while times and now - times[0] >= self.window_s:
            times.popleft()
        return times

    def retry_after(self, username: str, client: str) -> int:
        """Seconds to wait before trying again; 0 when a try is allowed now."""
        now = time.monotonic()
        with self._lock:
            if len(self._seen) > 100_000:  # bounded memory under a flood of names
                self._seen.clear()
            times = self._recent((username.lower(), client), now)
            if len(times) < self.failures:
                return 0
            return max(1, math.ceil(self.window_s - (now - times[0])))

    def failed(self, username: str, client: str) -> None:
        with self._lock:
            self._recent((username.lower(), client), time.monotonic()).append(time.monotonic())

    def succeeded(self, username: str, client: str) -> None:
        with self._lock:
            self._seen.pop((username.lower(), client), None)


class Auth:
    """Sessions and keys for one gateway."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.secret = session_secret(settings)
        self.ttl = timedelta(seconds=settings.session_ttl_s)
        self.db = db
        self.limiter = LoginLimiter()
        self._key_used: dict[int, float] = {}

    # -- sessions -----------------------------------------------------------------------------
    def issue(self, user: User) -> tuple[str, str]:
        """(session token, csrf value) for a freshly logged-in user."""
        csrf = secrets.token_urlsafe(24)
        now = utcnow()
        claims = {
            "sub": str(user.id),
            "ver": user.token_version,
            "csrf": csrf,
            "iat": now,
            "exp": now + self.ttl,
        }
        return jwt.encode(claims, self.secret, algorithm=ALGORITHM), csrf

    def claims(self, token: str | None) -> dict[str, Any] | None:
        if not token or len(token) > 4096:
            return None
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self.secret,
                algorithms=[ALGORITHM],
                options={"require": ["exp", "sub", "ver", "csrf"]},
            )
        except jwt.PyJWTError:
            return None
        return claims

    def set_cookies(self, request: Request, response: Response, token: str, csrf: str) -> None:
        secure = request.url.scheme == "https"
        age = int(self.ttl.total_seconds())
        response.set_cookie(
            SESSION_COOKIE, token, max_age=age, path="/", secure=secure, httponly=True,
            samesite="strict",
        )  # fmt: skip
        response.set_cookie(
            CSRF_COOKIE, csrf, max_age=age, path="/", secure=secure, httponly=False,
            samesite="strict",
        )  # fmt: skip

    @staticmethod
    def clear_cookies(response: Response) -> None:
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        response.delete_cookie(CSRF_COOKIE, path="/", samesite="strict")

    async def session_user(self, cookies: dict[str, str]) -> tuple[User, dict[str, Any]]:
        """The user of a valid session cookie; ApiError 401 otherwise."""
        claims = self.claims(cookies.get(SESSION_COOKIE))
        if claims is None or not str(claims["sub"]).isdigit():
            raise not_authenticated()
        async with self.db.session() as session:
            user = await session.get(User, int(claims["sub"]))
        if user is None or user.token_version != claims["ver"]:
            raise not_authenticated()
        return user, claims

    async def current_user(self, request: Request) -> User:
        """FastAPI dependency: the logged-in user; unsafe methods also need the CSRF header."""
        user, claims = await self.session_user(dict(request.cookies))
        if request.method not in SAFE_METHODS:
            sent = request.headers.get(CSRF_HEADER, "")
            if not sent or not hmac.compare_digest(sent.encode(), str(claims["csrf"]).encode()):
                raise ApiError(
                    403, "csrf_failed", f"missing or wrong {CSRF_HEADER} header", "permission_error"
                )
        return user

    async def bump_version(self, user_id: int) -> None:
        """End every session of the user."""
        async with self.db.session() as session, session.begin():
            await session.execute(
                update(User).where(User.id == user_id).values(token_version=User.token_version + 1)
            )

    # -- API keys -----------------------------------------------------------------------------
    async def api_key_user(self, request: Request) -> User:
        """FastAPI dependency of ``/v1/*``: the owner of the bearer key; 401 otherwise."""
        header = request.headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret.startswith(KEY_PREFIX) or len(secret) > 200:
            raise _bad_key(
                "missing API key: send `Authorization: Bearer llmt-...` (create a key in the "
                "web UI or with `llmtree keys create`)"
            )
        async with self.db.session() as session:
            row = (
                await session.execute(
                    select(ApiKey, User)
                    .join(User, User.id == ApiKey.user_id)
                    .where(ApiKey.key_hash == key_hash(secret))
                )
            ).first()
            if row is None:
                raise _bad_key("incorrect API key provided")
            key, user = row
            now = time.monotonic()
            if now - self._key_used.get(key.id, -math.inf) >= KEY_USED_EVERY_S:
                self._key_used[key.id] = now
                await session.execute(
                    update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=utcnow())
                )
                await session.commit()
        request.state.user = user  # for the per-user limits (gateway/limits.py)
        return user


def _bad_key(message: str) -> ApiError:
    return ApiError(
        401, "invalid_api_key", message, "invalid_request_error",
        headers={"WWW-Authenticate": "Bearer"},
    )  # fmt: skip

"""``llmtree keys create|list|revoke``: API keys straight in the chat database, and the dev
account that ``llmtree up`` prepares (user ``dev``, a key in ``<var_dir>/dev-api-key``, the session
signing key in ``<var_dir>/jwt.secret``).

Light to import (the CLI parser and the bench client load it); the database parts are imported
when a command runs."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from llmtree.config import Settings
from llmtree.errors import ConfigError

if TYPE_CHECKING:
    from llmtree.gateway.db import Database
    from llmtree.gateway.db.models import User

DEV_USER = "dev"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_action", required=True, metavar="ACTION")
    create = sub.add_parser("create", help="create a key for a user and print its secret once")
    create.add_argument("--user", required=True, help="the key's owner (an existing username)")
    create.add_argument("--name", default="cli", help="a label for the key (default 'cli')")
    listing = sub.add_parser("list", help="list keys (of one user with --user)")
    listing.add_argument("--user", help="only this user's keys")
    revoke = sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("id", type=int)


def run_keys(args: argparse.Namespace, settings: Settings) -> int:
    from llmtree.gateway.db import Database

    return asyncio.run(_run(args, Database(settings.db_url)))


async def _user(db: Database, username: str) -> User:
    from sqlalchemy import select

    from llmtree.gateway.db.models import User

    async with db.session() as session:
        user = (
            await session.execute(select(User).where(User.username == username))
        ).scalar_one_or_none()
    if user is None:
        raise ConfigError(f"no user {username!r}; register it in the web UI first")
    return user


async def _run(args: argparse.Namespace, db: Database) -> int:
    from sqlalchemy import delete, select

    from llmtree.gateway.db.models import ApiKey, User, iso

    try:
        await db.start()
        if args.keys_action == "create":
            user = await _user(db, args.user)
            name = args.name.strip()[:100] or "cli"
            secret = await add_key(db, user.id, name)
            print(secret)
            print(f"(key for {user.username!r}; it is shown only now)", flush=True)
        elif args.keys_action == "list":
            async with db.session() as session:
                query = select(ApiKey, User.username).join(User, User.id == ApiKey.user_id)
                if args.user:
                    query = query.where(User.username == args.user)
                rows = (await session.execute(query.order_by(ApiKey.id))).all()
            print(f"{'ID':>5}  {'USER':<16} {'NAME':<20} {'PREFIX':<10} {'CREATED':<28} LAST USED")
            for key, username in rows:
                print(
                    f"{key.id:>5}  {username:<16} {key.name[:20]:<20} {key.prefix:<10} "
                    f"{iso(key.created_at) or '-':<28} {iso(key.last_used_at) or '-'}"
                )
        else:
            async with db.session() as session, session.begin():
                result = await session.execute(delete(ApiKey).where(ApiKey.id == args.id))
            if not getattr(result, "rowcount", 0):
                raise ConfigError(f"no key with id {args.id}; see `llmtree keys list`")
            print(f"revoked key {args.id}")
    finally:
        await db.close()
    return 0


async def add_key(db: Database, user_id: int, name: str) -> str:
    from llmtree.gateway.auth import new_api_key
    from llmtree.gateway.db.models import ApiKey

    secret, prefix, hashed = new_api_key()
    async with db.session() as session, session.begin():
        session.add(ApiKey(user_id=user_id, name=name, prefix=prefix, key_hash=hashed))
    return secret


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text + "\n")
    os.chmod(path, 0o600)


def ensure_jwt_secret(settings: Settings) -> str:
    """The configured signing key, else the one in <var_dir>/jwt.secret (made once)."""
    if len(settings.jwt_secret.strip()) >= 32:
        return settings.jwt_secret.strip()
    path = settings.var_dir / "jwt.secret"
    try:
        secret = path.read_text().strip()
    except OSError:
        secret = ""
    if len(secret) < 32:
        secret = secrets.token_urlsafe(48)
        _write_private(path, secret)
    return secret


def ensure_dev_key(settings: Settings) -> str:
    """User ``dev`` and its key (made once; the secret lives in <var_dir>/dev-api-key)."""
    return asyncio.run(_ensure_dev_key(settings))


async def _ensure_dev_key(settings: Settings) -> str:
    from sqlalchemy import select

    from llmtree.gateway.auth import hash_password, key_hash
    from llmtree.gateway.db import Database
    from llmtree.gateway.db.models import ApiKey, User

    path = settings.var_dir / "dev-api-key"
    db = Database(settings.db_url)
    try:
        await db.start()
        try:
            secret = path.read_text().strip()
        except OSError:
            secret = ""
        async with db.session() as session, session.begin():
            user = (
                await session.execute(select(User).where(User.username == DEV_USER))
            ).scalar_one_or_none()
            if user is None:
                user = User(
                    username=DEV_USER, password_hash=await hash_password(secrets.token_urlsafe(24))
                )
                session.add(user)
                await session.flush()
            if user.tier is None:
                user.tier = "admin"  # generous limits for the local dev user (gateway/tiers.py)
            if secret:
                known = (
                    await session.execute(
                        select(ApiKey.id).where(
                            ApiKey.key_hash == key_hash(secret), ApiKey.user_id == user.id
                        )
                    )
                ).scalar_one_or_none()
                if known is not None:
                    return secret
            user_id = user.id
        secret = await add_key(db, user_id, "llmtree up")
        _write_private(path, secret)
        return secret
    finally:
        await db.close()


def read_dev_key(var_dir: Path) -> str | None:
    """The key ``llmtree up`` wrote, if any."""
    try:
        return (var_dir / "dev-api-key").read_text().strip() or None
    except OSError:
        return None

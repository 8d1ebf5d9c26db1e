"""The chat database: an async SQLAlchemy engine, its migrations and start-up recovery.

``Database(url)`` accepts ``sqlite+aiosqlite:///path`` (WAL, foreign keys on) and
``postgresql+asyncpg://user@host/db``. ``start()`` creates the SQLite file's folder, brings the
schema to the newest Alembic revision shipped in ``migrations/``. A gateway's database is
created with its ``owner`` name (``gateway@host:port``): its ``start()`` also marks the answers that
this gateway left ``streaming`` when it died as ``interrupted``, and leaves alone the live answers
of other gateways sharing the database. Tools (``llmtree keys``, ``users``) have no owner and
recover nothing.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from sqlalchemy import event, or_, update
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from llmtree.errors import ConfigError
from llmtree.gateway.db.models import Message

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SUPPORTED = ("sqlite+aiosqlite", "postgresql+asyncpg")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _upgrade(connection: Connection) -> None:
    logging.getLogger("alembic").setLevel(logging.WARNING)  # before its import logs plugins
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def gateway_owner(host: str, port: int) -> str:
    """The name a gateway writes on the answers it streams; stable across its restarts."""
    return f"gateway@{host}:{port}"


class Database:
    def __init__(self, url: str, owner: str | None = None) -> None:
        self.owner = owner
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise ConfigError(f"database_url {url!r} is not a database URL") from None
        if parsed.drivername not in SUPPORTED:
            raise ConfigError(
                f"database_url must start with sqlite+aiosqlite:// or postgresql+asyncpg://, "
                f"not {parsed.drivername}://"
            )
        self.url = parsed
        self.is_sqlite = parsed.drivername.startswith("sqlite")
        if self.is_sqlite and parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: AsyncEngine = create_async_engine(parsed, pool_pre_ping=True)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.session: async_sessionmaker[AsyncSession] = async_sessionmaker(
            self.engine, expire_on_commit=False
        )

    async def start(self) -> int:
        """Migrate to the newest schema; returns how many of this owner's answers were marked
        interrupted (rows from before owners were recorded count as everybody's)."""
        recovered = 0
        try:
            async with self.engine.begin() as connection:
                await connection.run_sync(_upgrade)
            if self.owner is not None:
                async with self.session() as session, session.begin():
                    result = await session.execute(
                        update(Message)
                        .where(
                            Message.status == "streaming",
                            or_(Message.owner == self.owner, Message.owner.is_(None)),
                        )
                        .values(status="interrupted", error="the gateway stopped during the answer")
                    )
                recovered = int(getattr(result, "rowcount", 0) or 0)
        except (SQLAlchemyError, OSError) as error:
            where = self.url.render_as_string(hide_password=True)
            raise ConfigError(f"cannot open the chat database {where}: {error}") from None
        if recovered:
            logger.info("marked %d answers left streaming as interrupted", recovered)
        return recovered

    async def close(self) -> None:
        await self.engine.dispose()


def prepare_database(url: str, owner: str | None = None) -> None:
    """Migrate and recover once before the server starts, so a database that cannot be opened is
    one clear ConfigError at the command line instead of a failed ASGI start-up. Does nothing
    inside a running event loop (the app's start-up does the same work anyway)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return

    async def run() -> None:
        db = Database(url, owner)
        try:
            await db.start()
        finally:
            await db.close()

    asyncio.run(run())

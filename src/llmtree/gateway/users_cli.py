"""``llmtree users list | set-tier U T | tiers``: users' rate-limit tiers in the chat database.

Light to import (the CLI parser loads it); the database parts are imported when a command runs.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

from llmtree.config import Settings
from llmtree.errors import ConfigError
from llmtree.gateway.tiers import load_tiers

if TYPE_CHECKING:
    from llmtree.gateway.db import Database


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="users_action", required=True, metavar="ACTION")
    sub.add_parser("list", help="every user with its tier")
    set_tier = sub.add_parser("set-tier", help="put a user in a tier ('default' clears it)")
    set_tier.add_argument("user", help="an existing username")
    set_tier.add_argument("tier", help="a tier name (see `llmtree users tiers`) or 'default'")
    sub.add_parser("tiers", help="the configured tiers and their limits")


def run_users(args: argparse.Namespace, settings: Settings) -> int:
    tiers = load_tiers(settings.tiers)
    if args.users_action == "tiers":
        print(f"{'TIER':<12} {'REQ/MIN':>8} {'TOKENS/MIN':>11} {'AT ONCE':>8} {'PRIORITY':>9}")
        for tier in tiers.values():
            marker = "  (default)" if tier.name == settings.default_tier else ""
            print(
                f"{tier.name:<12} {tier.rpm or '-':>8} {tier.tpm or '-':>11} "
                f"{tier.concurrent or '-':>8} {tier.priority:>9}{marker}"
            )
        return 0
    if args.users_action == "set-tier" and args.tier != "default" and args.tier not in tiers:
        raise ConfigError(f"no tier {args.tier!r}; configured: {', '.join(tiers)}")
    from llmtree.gateway.db import Database

    return asyncio.run(_run(args, Database(settings.db_url), settings.default_tier))


async def _run(args: argparse.Namespace, db: Database, default_tier: str) -> int:
    from sqlalchemy import select, update

    from llmtree.gateway.db.models import User

    try:
        await db.start()
        if args.users_action == "list":
            async with db.session() as session:
                users = (await session.execute(select(User).order_by(User.id))).scalars().all()
            print(f"{'ID':>5}  {'USER':<32} TIER")
            for user in users:
                print(
                    f"{user.id:>5}  {user.username:<32} {user.tier or default_tier + ' (default)'}"
                )
            return 0
        tier = None if args.tier == "default" else args.tier
        async with db.session() as session, session.begin():
            result = await session.execute(
                update(User).where(User.username == args.user).values(tier=tier)
            )
        if not getattr(result, "rowcount", 0):
            raise ConfigError(f"no user {args.user!r}; see `llmtree users list`")
        print(f"{args.user}: tier {tier or default_tier + ' (default)'}")
        return 0
    finally:
        await db.close()

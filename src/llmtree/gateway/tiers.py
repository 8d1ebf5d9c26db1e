"""User tiers: what each tier may use per minute and at once, and the priority of its requests.

A user's tier is the ``users.tier`` column (NULL: the ``default_tier`` setting). The built-in
tiers below can be changed, and new ones added, with the ``tiers`` setting, a JSON object such
as ``{"free": {"rpm": 10}, "team": {"rpm": 300, "priority": 5}}`` (fields left out keep the
built-in value, or the ``free`` tier's for a new tier). A limit of 0 means unlimited.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields, replace
from typing import Any

from llmtree.errors import ConfigError
from llmtree.protocol import MAX_PRIORITY

TIER_NAME = re.compile(r"^[a-z0-9_-]{1,32}$")


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    rpm: int
    """Requests per minute (0: unlimited)."""
    tpm: int
    """Tokens per minute, prompt plus completion (0: unlimited)."""
    concurrent: int
    """Answers streaming at once (0: unlimited)."""
    priority: int
    """Put on every request; under load nodes admit higher priorities first."""


DEFAULT_TIERS: dict[str, Tier] = {
    "free": Tier("free", rpm=60, tpm=200_000, concurrent=4, priority=0),
    "pro": Tier("pro", rpm=600, tpm=2_000_000, concurrent=16, priority=10),
    "admin": Tier("admin", rpm=0, tpm=0, concurrent=0, priority=100),
}
LIMIT_FIELDS = ("rpm", "tpm", "concurrent", "priority")


def load_tiers(text: str) -> dict[str, Tier]:
    """The built-in tiers with the JSON overrides of ``text`` applied; ConfigError when bad."""
    tiers = dict(DEFAULT_TIERS)
    if not text.strip():
        return tiers
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"the tiers setting is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError('the tiers setting must be a JSON object {"tier": {"rpm": ...}}')
    known = {f.name for f in fields(Tier)} - {"name"}
    for name, values in data.items():
        if not isinstance(name, str) or not TIER_NAME.match(name):
            raise ConfigError(f"tier name {name!r}: use 1-32 of a-z, 0-9, '_' or '-'")
        if not isinstance(values, dict) or not set(values) <= known:
            raise ConfigError(f"tier {name!r}: give an object with fields {sorted(known)}")
        for key, value in values.items():
            low, high = (-MAX_PRIORITY, MAX_PRIORITY) if key == "priority" else (0, 10**12)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"tier {name!r}: {key} must be an integer in [{low}, {high}]")
        base = tiers.get(name, replace(DEFAULT_TIERS["free"], name=name))
        tiers[name] = replace(base, **values)
    return tiers


def tier_of(tiers: dict[str, Tier], name: str | None, default: str) -> Tier:
    """The tier called ``name``; the default tier for NULL or a name no longer configured."""
    if name and name in tiers:
        return tiers[name]
    return tiers.get(default) or DEFAULT_TIERS["free"]

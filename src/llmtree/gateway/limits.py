"""Per-user limits at the gateway: requests and tokens per minute and answers at once, by tier.

``Limiter.admit(user)`` takes one request of the user (or raises ``RateLimited``: 429 with
``Retry-After`` in the OpenAI shape, or the ``rate_limited`` ChatEvent) and returns an
``Admission`` that carries the tier's priority for the ``GenerateRequest``. The handler shows it
every event of the answer (``observe``); tokens are counted as they stream (flushed every
``FLUSH_TOKENS``) and at the end (``end``: the usage's prompt + completion tokens), which also
frees the user's concurrent slot and stores a deterministic answer in the response cache.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

import anyio

from llmtree.config import Settings
from llmtree.gateway.apierror import ApiError
from llmtree.gateway.shared_state import SharedState, make_state
from llmtree.gateway.tiers import Tier, load_tiers, tier_of

logger = logging.getLogger(__name__)

LEASE_TTL_S = 900.0
"""A lease (an answer streaming) not released by then is forgotten (its gateway died)."""
FLUSH_TOKENS = 64

WHAT = {
    "concurrent": "answers streaming at once",
    "requests": "requests per minute",
    "tokens": "tokens per minute",
}


class RateLimited(ApiError):
    def __init__(self, tier: Tier, reason: str, retry_after: float) -> None:
        self.retry_after = max(1, math.ceil(retry_after))
        limit = {"concurrent": tier.concurrent, "requests": tier.rpm, "tokens": tier.tpm}[reason]
        super().__init__(
            429, "rate_limited",
            f"rate limit of the {tier.name!r} tier reached ({limit} {WHAT[reason]}); "
            f"try again in {self.retry_after} s",
            "rate_limit_error", headers={"Retry-After": str(self.retry_after)},
        )  # fmt: skip

    def chat_event(self) -> dict[str, Any]:
        """The ChatEvent of the web chat (SSE and WebSocket)."""
        return {
            "type": "error",
            "code": "rate_limited",
            "message": f"You are sending messages too fast. Please try again in "
            f"{self.retry_after} s.",
            "retry_after": self.retry_after,
            "message_obj": None,
        }


@dataclass
class Admission:
    """One admitted request: its tier, and what it used so far."""

    limiter: Limiter
    user_key: str
    tier: Tier
    lease: str = field(default_factory=lambda: uuid.uuid4().hex)
    cache_key: str | None = None
    counted: int = 0
    pending: int = 0
    parts: list[str] = field(default_factory=list)
    final: dict[str, Any] | None = None
    ended: bool = False

    @property
    def priority(self) -> int:
        return self.tier.priority

    async def observe(self, event: dict[str, Any]) -> None:
        """Called with each event of the answer, in order; counts tokens as they stream."""
        self.pending += len(event.get("token_ids") or [])
        if self.cache_key is not None:
            self.parts.append(str(event.get("text") or ""))
        if event.get("finish_reason") is not None:
            self.final = event
        elif self.pending >= FLUSH_TOKENS and not self.ended:
            tokens, self.pending = self.pending, 0
            self.counted += tokens
            try:
                await self.limiter.state.add_tokens(self.user_key, self.lease, tokens)
            except Exception as error:  # noqa: BLE001 - limits must never break an answer
                logger.warning("could not count tokens: %s", error)

    async def end(self) -> None:
        """The answer ended (any way): count its remaining tokens, free the slot, cache it."""
        if self.ended:
            return
        self.ended = True
        with anyio.CancelScope(shield=True):
            try:
                usage = (self.final or {}).get("usage") or {}
                total = usage.get("total_tokens")
                if isinstance(total, int) and total >= self.counted:
                    remaining = total - self.counted
                else:
                    remaining = self.pending
                await self.limiter.state.add_tokens(self.user_key, self.lease, remaining)
                await self.limiter.state.release(self.user_key, self.lease)
                final = self.final or {}
                if (
                    self.cache_key is not None
                    and final.get("finish_reason") in ("stop", "length")
                    and not final.get("local")
                ):
                    await self.limiter.cache_put(
                        self.cache_key,
                        {
                            "text": "".join(self.parts),
                            "finish_reason": final["finish_reason"],
                            "usage": final.get("usage"),
                            "node": final.get("node"),
                        },
                    )
            except Exception as error:  # noqa: BLE001 - limits must never break an answer
                logger.warning("could not record the end of a request: %s", error)


class Limiter:
    """Tiers, limits and the response cache of one gateway, over the shared state."""

    def __init__(self, settings: Settings, state: SharedState | None = None) -> None:
        self.tiers = load_tiers(settings.tiers)
        self.default_tier = settings.default_tier
        self.state = state if state is not None else make_state(settings.redis_url)
        self.cache_on = settings.response_cache
        self.cache_ttl_s = settings.response_cache_ttl_s
        self.cache_size = settings.response_cache_size

    def tier(self, user: Any) -> Tier:
        return tier_of(self.tiers, getattr(user, "tier", None), self.default_tier)

    async def admit(self, user: Any) -> Admission:
        """Take one request of ``user``; RateLimited when one of its tier's limits is reached.
        When the shared state cannot be reached, the request passes (and it is logged)."""
        tier = self.tier(user)
        admission = Admission(self, f"u{user.id}", tier)
        try:
            decision = await self.state.acquire(
                admission.user_key, admission.lease, tier.rpm, tier.tpm, tier.concurrent,
                LEASE_TTL_S,
            )  # fmt: skip
        except Exception as error:  # noqa: BLE001 - e.g. Redis down: serve rather than refuse
            logger.warning("rate limits not checked (shared state unavailable): %s", error)
            admission.ended = True
            return admission
        if not decision.allowed:
            raise RateLimited(tier, decision.reason, decision.retry_after)
        return admission

    async def cache_get(self, key: str) -> dict[str, Any] | None:
        try:
            raw = await self.state.cache_get(key)
            data = json.loads(raw) if raw else None
        except Exception as error:  # noqa: BLE001 - a cache miss, never a failure
            logger.warning("response cache read failed: %s", error)
            return None
        return data if isinstance(data, dict) and isinstance(data.get("text"), str) else None

    async def cache_put(self, key: str, answer: dict[str, Any]) -> None:
        await self.state.cache_put(key, json.dumps(answer), self.cache_ttl_s, self.cache_size)

    async def close(self) -> None:
        await self.state.close()

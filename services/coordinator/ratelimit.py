"""Request rate limits in Redis (fixed one-minute windows, shared by every coordinator replica): per API key, and per
account across all of its keys (an account does not multiply its limit by creating keys)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from services.common.logs import get_logger

log = get_logger(__name__)
WINDOW_S = 60


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    retry_after_s: int = 0
    remaining: int = 0


# Requests per minute of one account, all of its keys and JWTs together (ACCOUNT_RATE_LIMIT_PER_MINUTE).
DEFAULT_ACCOUNT_LIMIT_PER_MINUTE = 1200


class RateLimiter:
    def __init__(self, redis, *, prefix: str = "farmesh:rl",
                 account_limit_per_minute: int = DEFAULT_ACCOUNT_LIMIT_PER_MINUTE):
        self.redis = redis
        self.prefix = prefix
        self.account_limit_per_minute = account_limit_per_minute

    async def admit(self, principal, *, scope: str = "") -> tuple[RateDecision, int, str]:
        """Count one request of ``principal`` against its key's limit and its account's. Returns the first refusal
        (decision, the limit it broke, "key" or "account"), else the key's decision. ``scope`` separates counters
        (the account API counts apart from inference)."""
        decision = await self.hit(f"{scope}{principal.key_id}", principal.rate_limit_per_minute)
        if not decision.allowed:
            return decision, principal.rate_limit_per_minute, "key"
        account = await self.hit(f"{scope}account-wide:{principal.account_id}", self.account_limit_per_minute)
        if not account.allowed:
            return account, self.account_limit_per_minute, "account"
        return decision, principal.rate_limit_per_minute, "key"

    async def hit(self, key_id: str, limit_per_minute: int, *, now: float | None = None) -> RateDecision:
        now = time.time() if now is None else now
        window = int(now // WINDOW_S)
        name = f"{self.prefix}:{key_id}:{window}"
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                count, _ = await pipe.incr(name).expire(name, WINDOW_S + 5).execute()
        except Exception as error:  # noqa: BLE001 - availability over limiting: a Redis outage lets requests through
            log.warning("rate limiter unavailable; request allowed", error=repr(error))
            return RateDecision(True, 0, limit_per_minute)
        if count > limit_per_minute:
            return RateDecision(False, max(1, int((window + 1) * WINDOW_S - now) + 1), 0)
        return RateDecision(True, 0, limit_per_minute - count)

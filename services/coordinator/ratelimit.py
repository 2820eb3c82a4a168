"""Per-key request rate limit in Redis (fixed one-minute windows, shared by every coordinator replica)."""

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


class RateLimiter:
    def __init__(self, redis, *, prefix: str = "farmesh:rl"):
        self.redis = redis
        self.prefix = prefix

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

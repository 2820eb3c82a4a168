"""The error answers of the coordinator's APIs: one exception type for the generate, OpenAI and account routes,
and the builders of the answers more than one service gives."""

from __future__ import annotations

from services.common.http import ApiError


class ServingError(ApiError):
    """An error answer of the coordinator's APIs (the shared ``{"error": {"code", "message"}}`` shape)."""


def rate_limited(limit_per_minute: int, retry_after_s: int, what: str = "requests",
                 whose: str = "key") -> ServingError:
    """The 429 of a key (or its whole account) over its per-minute limit, with the seconds to wait in the header and
    in the body."""
    return ServingError(429, "rate_limited",
                        f"more than {limit_per_minute} {what} per minute for this {whose}; retry after "
                        f"{retry_after_s} s",
                        headers={"Retry-After": str(retry_after_s)}, retry_after_s=retry_after_s)

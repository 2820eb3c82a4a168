"""What the coordinator's operator commands (``far-mesh keys|accounts|nodes``) share."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, TypeVar

import asyncpg

from services.common.config import get_settings

T = TypeVar("T")


def run_with_store(store_class: Callable[[asyncpg.Pool], object], fn: Callable[[object], Awaitable[T]]) -> T:
    """``fn(store_class(pool))`` on a small pool of POSTGRES_URL, closed afterwards: one command's database use."""

    async def runner() -> T:
        pool = await asyncpg.create_pool(get_settings().POSTGRES_URL, min_size=1, max_size=2)
        try:
            return await fn(store_class(pool))
        finally:
            await pool.close()

    return asyncio.run(runner())

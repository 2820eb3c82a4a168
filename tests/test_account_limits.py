"""An account does not multiply its limits by creating keys: requests are limited per key AND per account (across
every coordinator sharing the Redis), and key creation has a daily quota that revoking does not reset."""

from __future__ import annotations

import uuid
from decimal import Decimal

import asyncpg
import pytest

from services.coordinator.account_service import AccountService
from services.coordinator.accounts import AccountStore
from services.coordinator.errors import ServingError
from services.coordinator.ratelimit import RateLimiter
from tests.test_account_api import chain, coordinators  # noqa: F401  (fixtures: two replicas on one database)
from tests.test_coordinator_hardening import tokenizer  # noqa: F401  (fixture)


@pytest.fixture
async def stores(make_database, redis_url):
    import redis.asyncio as aioredis

    pool = await asyncpg.create_pool(make_database(), min_size=1, max_size=2)
    redis = aioredis.from_url(redis_url)
    yield AccountStore(pool), redis
    await redis.aclose()
    await pool.close()


async def test_rate_limit_is_account_wide_across_keys_and_coordinators(stores):
    accounts, redis = stores
    prefix = f"test:{uuid.uuid4().hex}"
    # Two coordinators: two limiters on the same Redis.
    coordinators = [RateLimiter(redis, prefix=prefix, account_limit_per_minute=6) for _ in range(2)]
    account_id = await accounts.create_account("many-keys")
    principals = []
    for _ in range(4):
        _, key = await accounts.create_key(account_id, rate_limit_per_minute=5)
        principals.append(await accounts.authenticate(f"Bearer {key}", ""))
    outcomes = []
    for i in range(8):  # each key well under its own 5 per minute
        decision, limit, whose = await coordinators[i % 2].admit(principals[i % 4])
        outcomes.append((decision.allowed, whose))
    assert [allowed for allowed, _ in outcomes] == [True] * 6 + [False] * 2
    assert outcomes[-1] == (False, "account")
    # Another account is not affected.
    other = await accounts.create_account("other")
    _, key = await accounts.create_key(other, rate_limit_per_minute=5)
    decision, _, _ = await coordinators[0].admit(await accounts.authenticate(f"Bearer {key}", ""))
    assert decision.allowed
    # The HTTP answer names the account.
    service = AccountService(accounts, coordinators[1], None)
    with pytest.raises(ServingError) as refused:
        await service.admit(principals[0])
        for _ in range(10):
            await service.admit(principals[1])
    assert refused.value.status == 429


async def test_key_creation_has_a_daily_quota_revoking_does_not_reset(stores):
    accounts, _ = stores
    account_id = await accounts.create_account("churn")
    _, key = await accounts.create_key(account_id, rate_limit_per_minute=10)
    principal = await accounts.authenticate(f"Bearer {key}", "")
    service = AccountService(accounts, None, None, max_keys=3, key_creations_per_day=4)
    created = []
    with pytest.raises(ServingError) as refused:
        for _ in range(10):  # create and revoke: never more than 2 active keys
            key_row = await service.create_key(principal, name=None, rate_limit_per_minute=None)
            created.append(key_row["key_id"])
            await service.revoke_key(principal, key_row["key_id"])
    assert refused.value.status == 429 and refused.value.code == "key_quota"
    assert len(created) == 3  # the first key counts: 4 created in the last 24 hours


async def test_two_coordinators_on_one_database_never_overdraw_an_account(coordinators):
    """Concurrent requests of one account through two coordinator replicas on the same PostgreSQL: each reservation
    is taken atomically by the database, so the balance never goes below zero and the books close exactly."""
    import asyncio

    _url, pool, services, clients = coordinators
    accounts = services[0].accounts
    account_id = await accounts.create_account("shared", Decimal("0.025"))  # 2 requests of max_tokens 100
    _, key = await accounts.create_key(account_id, rate_limit_per_minute=1000)
    auth = {"Authorization": f"Bearer {key}"}

    async def generate(i: int) -> int:
        response = await clients[i % 2].post("/mesh/inference/generate", headers=auth,
                                             json={"prompt": f"hi {i}", "max_tokens": 100, "stream": False})
        return response.status_code

    codes = await asyncio.gather(*(generate(i) for i in range(12)))
    assert set(codes) <= {200, 402} and 200 in codes and 402 in codes, codes
    row = await pool.fetchrow("SELECT balance_far, reserved_far FROM far_accounts WHERE account_id = $1",
                              uuid.UUID(account_id))
    charged = await pool.fetchval("SELECT coalesce(sum(cost_far), 0) FROM far_mesh_sessions WHERE account_id = $1",
                                  uuid.UUID(account_id))
    assert row["balance_far"] >= 0 and row["reserved_far"] == 0
    assert row["balance_far"] + charged == Decimal("0.025")

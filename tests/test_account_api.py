"""Self-service account API of the coordinator, in process (no swarm): the real HTTP app over the scripted engine, a
fresh database, a local py-evm chain for deposits. Balance, statement, usage per request, keys (revocation across two
coordinator replicas), rate limits, the 402 that says how to top up, OpenAPI, and the audit's books after it all."""

from __future__ import annotations

import uuid
from decimal import Decimal

import asyncpg
import httpx
import pytest
from eth_account import Account

from services.common.config import Settings
from services.coordinator.account_service import AccountService, DepositInfo
from services.coordinator.accounts import AccountStore
from services.coordinator.ratelimit import RateLimiter
from services.deposits.watcher import DepositWatcher, account_ref, deposit
from services.payouts.audit import run_audit
from services.payouts.chain import new_local_chain
from tests.test_coordinator_hardening import MODEL_ID, scripted_model, tokenizer  # noqa: F401  (fixture)

FAR = 10**18


@pytest.fixture
def chain():
    return new_local_chain()


@pytest.fixture
async def coordinators(make_database, tokenizer, chain):  # noqa: F811
    """Two coordinator replicas (two apps, two services) on one fresh database."""
    from services.coordinator.app import http_app
    from services.coordinator.serving import InferenceService
    from services.coordinator.store import Pricing, SessionStore

    url = make_database()
    pool = await asyncpg.create_pool(url, min_size=1, max_size=6)
    info = DepositInfo("local", chain.deposit.address, chain.token.address, 2)
    apps, services, clients = [], [], []
    for i in range(2):
        service = InferenceService(store=SessionStore(pool), accounts=AccountStore(pool), limiter=None,
                                   models={MODEL_ID: scripted_model(tokenizer)}, readiness={},
                                   default_model_id=MODEL_ID,
                                   pricing=Pricing(Decimal("0.0001"), Decimal(0), 1000),
                                   coordinator_id=f"acct-{i}-{uuid.uuid4().hex[:6]}", jwt_secret="", max_workers=2,
                                   deposit_info=info, max_api_keys=3)
        app = http_app(Settings(JWT_SECRET=""))
        app.state.service = service
        services.append(service)
        clients.append(httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://c{i}"))
    yield url, pool, services, clients
    for client in clients:
        await client.aclose()
    for service in services:
        await service.aclose()
    await pool.close()


async def test_balance_deposit_usage_ledger_and_books(coordinators, chain):
    url, pool, services, (c0, c1) = coordinators
    accounts = services[0].accounts
    account_id = await accounts.create_account("dev", Decimal("0.001"))
    _, key = await accounts.create_key(account_id, rate_limit_per_minute=100)
    auth = {"Authorization": f"Bearer {key}"}

    body = (await c0.get("/mesh/account", headers=auth)).json()
    assert body["balance_far"] == "0.001" and body["available_far"] == "0.001" and body["reserved_far"] == "0"
    assert body["deposit"]["account_ref"] == account_ref(account_id)
    assert body["deposit"]["contract"] == chain.deposit.address and body["deposit"]["confirmations"] == 2
    assert (await c0.get("/mesh/account")).status_code == 401

    # Too little for 100 tokens (0.01 FAR): the 402 says how much is short and how to deposit.
    response = await c0.post("/mesh/inference/generate", headers=auth,
                             json={"prompt": "hi", "max_tokens": 100, "stream": False})
    assert response.status_code == 402
    error = response.json()["error"]
    assert error["shortfall_far"] == "0.009" and error["deposit"]["account_ref"] == account_ref(account_id)
    assert "deposit at least 0.009 FAR" in error["message"]

    # Deposit 1 FAR on chain; credited by the watcher once 2 blocks deep.
    user = Account.create()
    chain.w3.eth.send_transaction({"from": chain.w3.eth.accounts[0], "to": user.address, "value": 10**20})
    chain.send(chain.token.functions.transfer(user.address, 5 * FAR).build_transaction({"from": chain.address}))
    receipt = deposit(chain, user, account_id, FAR)
    chain.advance(2)
    assert len((await DepositWatcher(url, chain, confirmations=2).run_once()).credited) == 1
    assert (await c1.get("/mesh/account", headers=auth)).json()["available_far"] == "1.001"

    response = await c0.post("/mesh/inference/generate", headers=auth,
                             json={"prompt": "hi", "max_tokens": 100, "stream": False, "request_id": "r1"})
    assert response.status_code == 200, response.text
    final = response.json()
    tokens = final["usage"]["completion_tokens"]
    assert final["cost_far"] == str(Decimal("0.0001") * tokens)

    usage = (await c1.get("/mesh/account/usage", headers=auth)).json()
    [request] = usage["requests"]
    assert request["request_id"] == "r1" and request["completion_tokens"] == tokens
    assert request["cost_far"] == final["cost_far"] and request["reserved_far"] == "0.01"
    assert usage["totals"]["requests"] == 1 and usage["daily"][0]["cost_far"] == final["cost_far"]

    ledger = (await c0.get("/mesh/account/ledger", headers=auth)).json()["entries"]
    assert [e["kind"] for e in ledger] == ["charge", "deposit", "grant"]
    charge, credit, grant = ledger
    assert charge["amount_far"] == "-" + final["cost_far"] and charge["request_id"] == "r1"
    assert Decimal(charge["refunded_far"]) == Decimal("0.01") - Decimal(final["cost_far"])
    assert credit["amount_far"] == "1" and credit["tx_hash"] == "0x" + bytes(receipt["transactionHash"]).hex()
    assert grant["amount_far"] == "0.001"
    body = (await c0.get("/mesh/account", headers=auth)).json()
    assert Decimal(body["balance_far"]) == Decimal("1.001") - Decimal(final["cost_far"])
    assert body["deposited_far"] == "1" and body["charged_far"] == final["cost_far"]

    report = await run_audit(url, chain, accounts=True)
    assert report.ok, [(c.name, c.problems) for c in report.checks if not c.ok]


async def test_keys_create_list_revoke_across_replicas(coordinators):
    url, pool, services, (c0, c1) = coordinators
    accounts = services[0].accounts
    account_id = await accounts.create_account("keys")
    _, key = await accounts.create_key(account_id, rate_limit_per_minute=60)
    auth = {"Authorization": f"Bearer {key}"}

    response = await c0.post("/mesh/account/keys", headers=auth, json={"name": "ci", "rate_limit_per_minute": 1000})
    assert response.status_code == 201, response.text
    new = response.json()
    assert new["key"].startswith("fl_") and new["rate_limit_per_minute"] == 60  # never above the creator's limit
    new_auth = {"Authorization": f"Bearer {new['key']}"}
    assert (await c1.get("/mesh/account", headers=new_auth)).status_code == 200

    keys = (await c1.get("/mesh/account/keys", headers=new_auth)).json()["keys"]
    assert {k["key_id"] for k in keys} == {new["key_id"], keys[0]["key_id"]} and len(keys) == 2
    assert [k["current"] for k in keys if k["key_id"] == new["key_id"]] == [True]
    assert all("key" not in k for k in keys)

    # Revoked on replica 0, refused by replica 1 at the very next request.
    revoked = (await c0.delete(f"/mesh/account/keys/{new['key_id']}", headers=auth)).json()
    assert revoked["revoked_at"] is not None
    response = await c1.get("/mesh/account", headers=new_auth)
    assert response.status_code == 401 and "revoked" in response.json()["error"]["message"]
    assert (await c1.post("/mesh/inference/generate", headers=new_auth,
                          json={"prompt": "x", "max_tokens": 1})).status_code == 401

    # Another account's key cannot be revoked (or even seen); garbage ids are 404 too.
    other_id = await accounts.create_account("other")
    other_key_id, _ = await accounts.create_key(other_id)
    assert (await c0.delete(f"/mesh/account/keys/{other_key_id}", headers=auth)).status_code == 404
    assert (await c0.delete("/mesh/account/keys/not-a-uuid", headers=auth)).status_code == 404

    # At most max_api_keys (3 here) active keys.
    codes = [(await c0.post("/mesh/account/keys", headers=auth, json={})).status_code for _ in range(3)]
    assert codes == [201, 201, 409]


async def test_account_api_is_rate_limited_per_key(make_database, redis_url):
    import redis.asyncio as aioredis

    url = make_database()
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    redis = aioredis.from_url(redis_url)
    try:
        accounts = AccountStore(pool)
        account_id = await accounts.create_account("rl")
        key_id, key = await accounts.create_key(account_id, rate_limit_per_minute=2)
        service = AccountService(accounts, RateLimiter(redis, prefix=f"test:{uuid.uuid4().hex}"), None)
        principal = await accounts.authenticate(f"Bearer {key}", "")
        await service.admit(principal)
        await service.admit(principal)
        from services.coordinator.serving import ServingError

        with pytest.raises(ServingError) as error:
            await service.admit(principal)
        assert error.value.status == 429 and int(error.value.headers["Retry-After"]) >= 1
    finally:
        await redis.aclose()
        await pool.close()


def test_openapi_documents_the_account_api():
    from services.coordinator.app import http_app

    schema = http_app(Settings(JWT_SECRET="")).openapi()
    paths = schema["paths"]
    assert {"get"} <= set(paths["/mesh/account"]) and {"get", "post"} <= set(paths["/mesh/account/keys"])
    assert "delete" in paths["/mesh/account/keys/{key_id}"]
    assert {"/mesh/account/ledger", "/mesh/account/usage"} <= set(paths)
    assert "nodes" in schema["components"]["schemas"]["UsageRequest"]["properties"]
    assert "requestBody" in paths["/mesh/account/keys"]["post"]

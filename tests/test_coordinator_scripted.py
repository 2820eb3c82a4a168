"""The coordinator's delicate paths, fast and without a swarm: the real app (``create_app``, its lifespan, uvicorn in
a thread, real sockets) over real PostgreSQL and Redis, with the scripted engine of tests/scripted_engine.py in place
of the Petals client. Admission order, idempotent replay, cancel races, the generation timeout, settling exactly
once and the mapping of engine failures to error codes."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from decimal import Decimal

import httpx
import pytest
import pytest_asyncio

from services.common.config import Settings
from services.common.petals_adapter import SwarmUnavailable
from services.coordinator.engine_protocol import EngineGeneration, EngineModel
from services.coordinator.metering import WorkMeter
from services.coordinator.sampling import SamplingParams
from tests.fixtures.swarm import asse_events, create_api_key
from tests.scripted_engine import (DEFAULT_ROUTE, Script, ScriptedModel, ScriptedReadiness, scripted_engine,
                                   serve_app)

MODEL_ID = "test/scripted"
MAX_RUNNING, MAX_QUEUED = 2, 3
PRICE = Decimal("0.0001")  # per generated token; prompt tokens free; fee 10 %
GENERATE = "/mesh/inference/generate"


class Live:
    def __init__(self, url, app, model, readiness):
        self.url, self.app, self.model, self.readiness = url, app, model, readiness

    @property
    def service(self):
        return self.app.state.service


@pytest.fixture(scope="module")
def live(tiny_model_dir, postgres_url, redis_url):
    """The coordinator app served by uvicorn in a thread of its own (its own event loop), stopped at the end."""
    from transformers import AutoTokenizer

    from services.coordinator.app import create_app

    model = ScriptedModel(MODEL_ID, AutoTokenizer.from_pretrained(tiny_model_dir))
    assert isinstance(model, EngineModel) and isinstance(model.start([1], SamplingParams(max_tokens=1), WorkMeter()),
                                                         EngineGeneration)
    readiness = ScriptedReadiness(MODEL_ID)
    settings = Settings(POSTGRES_URL=postgres_url, REDIS_URL=redis_url, DEFAULT_MODEL_ID=MODEL_ID, JWT_SECRET="",
                        PRICE_PER_TOKEN_FAR=PRICE, PRICE_PER_PROMPT_TOKEN_FAR=Decimal(0), PLATFORM_FEE_BPS=1000,
                        MAX_RUNNING_GENERATIONS=MAX_RUNNING, MAX_QUEUED_GENERATIONS=MAX_QUEUED, MAX_QUEUE_WAIT_S=30,
                        GENERATION_TIMEOUT_S=60)
    app = create_app(settings, coordinator_id=f"scripted-{uuid.uuid4().hex[:6]}",
                     engine_factory=scripted_engine(model, readiness))
    with serve_app(app, "scripted-coordinator") as url:
        assert readiness.started
        yield Live(url, app, model, readiness)
    assert model.shut_down and readiness.stopped  # the lifespan closed the engine


@pytest_asyncio.fixture(loop_scope="session")
async def client(live):
    live.model.script = Script()  # each test sets its own
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
        yield http
    for account_id, request_id in list(live.service.active):  # a failed test leaves no generation holding a slot
        live.service.cancel(request_id, account_id)


async def account(postgres_url, balance="1") -> tuple[str, dict]:
    account_id, key = await create_api_key(postgres_url, balance=balance)
    return account_id, {"Authorization": f"Bearer {key}"}


async def account_row(db_pool, account_id):
    return await db_pool.fetchrow("SELECT balance_far, reserved_far FROM far_accounts WHERE account_id = $1",
                                  uuid.UUID(account_id))


async def session_row(db_pool, request_id):
    return await db_pool.fetchrow("SELECT * FROM far_mesh_sessions WHERE request_id = $1", request_id)


async def until(predicate, timeout=10.0, what="condition"):
    """Poll ``predicate`` (sync or async) every 20 ms, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def assert_settled_once(db_pool, request_id, account_id, balance_before: Decimal):
    """The session is final, its charge = Σ contributions + fee, and the account was debited exactly that."""
    session = await session_row(db_pool, request_id)
    assert session["status"] != "running"
    paid = await db_pool.fetch("SELECT * FROM far_session_contributions WHERE session_id = $1",
                               session["session_id"])
    assert session["cost_far"] == session["completion_tokens"] * PRICE
    if session["cost_far"]:
        assert session["fee_far"] + sum(r["payment_far"] for r in paid) == session["cost_far"]
    account = await account_row(db_pool, account_id)
    assert account["reserved_far"] == 0 and account["balance_far"] == balance_before - session["cost_far"]
    return session, paid


# ------------------------------------------------------------------------------------------------ admission
async def test_admission_is_fifo_over_max_running_and_503_beyond_the_queue(live, client, postgres_url, db_pool):
    live.model.script = Script(hang_at=1)  # every generation holds its slot until it is cancelled
    account_id, headers = await account(postgres_url)
    gate, started = live.service.admission[MODEL_ID], live.model.started
    first = len(started)
    ids = [f"fifo{i}_{uuid.uuid4().hex[:6]}" for i in range(MAX_RUNNING + MAX_QUEUED)]
    tasks = []
    for i, request_id in enumerate(ids):
        tasks.append(asyncio.create_task(client.post(GENERATE, headers=headers, json={
            "prompt": f"request number {i}", "max_tokens": 4, "stream": False, "request_id": request_id})))
        if i < MAX_RUNNING:
            await until(lambda: len(started) == first + i + 1, what=f"request {i} to start")
        else:
            await until(lambda: gate.waiting == i - MAX_RUNNING + 1, what=f"request {i} to queue")
    over = await client.post(GENERATE, headers=headers, json={"prompt": "one too many", "stream": False})
    assert over.status_code == 503 and over.json()["error"]["code"] == "overloaded"
    assert over.headers["Retry-After"] == "2" and over.json()["error"]["waiting"] == MAX_QUEUED
    for i, request_id in enumerate(ids):  # free the oldest slot: the oldest waiter starts, nobody else
        response = await client.delete(f"/mesh/inference/{request_id}", headers=headers)
        assert response.json() == {"request_id": request_id, "status": "cancelling"}
        expected = min(first + i + 1 + MAX_RUNNING, first + len(ids))
        await until(lambda: len(started) == expected and gate.waiting == max(0, MAX_QUEUED - i - 1),
                    what="the next waiter to start")
    prompts = [live.model.tokenizer.decode(s.prompt_ids, skip_special_tokens=True).strip() for s in started[first:]]
    assert prompts == [f"request number {i}" for i in range(len(ids))]
    for response in await asyncio.gather(*tasks):
        body = response.json()
        assert response.status_code == 200 and body["finish_reason"] == "cancelled"
        assert body["usage"]["completion_tokens"] == 0 and body["cost_far"] == "0"
    assert dict(await account_row(db_pool, account_id)) == {"balance_far": Decimal(1), "reserved_far": 0}
    assert gate.running == 0


# --------------------------------------------------------------------------------------------- idempotency
async def test_a_request_id_is_run_once_then_replayed(live, client, postgres_url, db_pool):
    hold = threading.Event()
    live.model.script = Script(hold=hold)  # the first step waits until the racing request was answered
    account_id, headers = await account(postgres_url)
    request_id = f"idem_{uuid.uuid4().hex[:8]}"
    payload = {"prompt": "hello", "max_tokens": 5, "stream": False, "request_id": request_id}
    first = asyncio.create_task(client.post(GENERATE, headers=headers, json=payload))
    try:
        await until(lambda: live.service.running(request_id, account_id) is not None, what="the request to run")
        racing = await client.post(GENERATE, headers=headers, json=payload)
    finally:
        hold.set()
    assert racing.status_code == 409 and racing.json()["error"]["code"] == "request_in_progress"
    done = (await first).json()
    assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 5
    runs = len(live.model.started)
    replay = await client.post(GENERATE, headers=headers, json={**payload, "max_tokens": 9})
    assert replay.status_code == 200 and replay.json() == done  # the stored result, not a new generation
    async with client.stream("POST", GENERATE, headers=headers, json={**payload, "stream": True}) as streamed:
        events = [e["data"] async for e in asse_events(streamed)]
    assert events == [done]
    assert len(live.model.started) == runs
    await assert_settled_once(db_pool, request_id, account_id, Decimal(1))  # charged once


# ------------------------------------------------------------------------------------------------- cancels
async def test_delete_during_a_step_drops_that_step_and_bills_what_was_streamed(live, client, postgres_url, db_pool):
    live.model.script = Script(step_s=0.25, eos=False)
    account_id, headers = await account(postgres_url)
    request_id = f"del_{uuid.uuid4().hex[:8]}"
    tokens, done = [], None
    async with client.stream("POST", GENERATE, headers=headers,
                             json={"prompt": "hello", "max_tokens": 100, "request_id": request_id}) as response:
        async for event in asse_events(response):
            if event["data"].get("done"):
                done = event["data"]
                break
            tokens.append(event["data"]["token"])
            if len(tokens) == 2:  # the third step is running now
                deleted = await client.delete(f"/mesh/inference/{request_id}", headers=headers)
                assert deleted.json()["status"] == "cancelling"
    assert done["finish_reason"] == "cancelled" and done["usage"]["completion_tokens"] == len(tokens) < 100
    assert done["text"] == "".join(tokens)
    assert live.model.started[-1].generation.completion_tokens == len(tokens)
    session, paid = await assert_settled_once(db_pool, request_id, account_id, Decimal(1))
    assert session["status"] == "cancelled" and session["completion_tokens"] == len(tokens)
    # the step the DELETE landed in was computed (its servers are credited) but its token was not emitted or billed
    assert {r["steps"] for r in paid} == {len(tokens) + 1}
    status = (await client.get(f"/mesh/inference/{request_id}", headers=headers)).json()
    assert status["status"] == "cancelled" and status["tokens_generated"] == len(tokens)


async def test_a_client_that_disconnects_mid_stream_stops_the_generation_and_is_billed_once(
        live, client, postgres_url, db_pool):
    live.model.script = Script(step_s=0.05, eos=False)
    account_id, headers = await account(postgres_url)
    request_id = f"gone_{uuid.uuid4().hex[:8]}"
    received = 0
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as own:  # its connection is closed on exit
        async with own.stream("POST", GENERATE, headers=headers,
                              json={"prompt": "hello", "max_tokens": 200, "request_id": request_id}) as response:
            async for _ in asse_events(response):
                received += 1
                if received == 3:
                    break
    started = live.model.started[-1]
    await until(lambda: started.cancel.is_set(), what="the generation to be cancelled")
    session = await until(lambda: _final(db_pool, request_id), what="the session to be settled")
    assert session["status"] == "cancelled" and 3 <= session["completion_tokens"] < 200
    await assert_settled_once(db_pool, request_id, account_id, Decimal(1))
    assert live.service.running(request_id, account_id) is None


async def _final(db_pool, request_id):
    row = await session_row(db_pool, request_id)
    return row if row is not None and row["status"] != "running" else None


# ------------------------------------------------------------------------------------------------- timeout
async def test_a_hung_step_ends_with_504_generation_timeout_billing_the_tokens_generated(
        live, client, postgres_url, db_pool, monkeypatch):
    monkeypatch.setattr(live.service, "generation_timeout_s", 1.0)
    live.model.script = Script(hang_at=3)
    account_id, headers = await account(postgres_url)
    request_id = f"slow_{uuid.uuid4().hex[:8]}"
    started_at = time.monotonic()
    response = await client.post(GENERATE, headers=headers,
                                 json={"prompt": "hello", "max_tokens": 10, "stream": False, "request_id": request_id})
    assert 1.0 <= time.monotonic() - started_at < 10
    error = response.json()["error"]
    assert response.status_code == 504 and error["code"] == "generation_timeout"
    assert error["tokens_generated"] == 2 and error["cost_far"] == "0.0002"
    assert live.model.started[-1].cancel.is_set()  # the hung step was told to stop
    session, _ = await assert_settled_once(db_pool, request_id, account_id, Decimal(1))
    assert session["status"] == "failed" and session["completion_tokens"] == 2


# -------------------------------------------------------------------------------------------------- settle
async def test_settled_exactly_once_charge_is_contributions_plus_fee(live, client, postgres_url, db_pool):
    from services.coordinator.store import SessionStore

    tag = uuid.uuid4().hex[:8]
    route = ((f"QmSettleA{tag}", 0, 2), (f"QmSettleB{tag}", 2, 4))
    for i, (peer, start, end) in enumerate(route):  # registered nodes are paid (unregistered peers earn nothing)
        await db_pool.execute("INSERT INTO far_nodes (peer_id, wallet_address, model_id, start_block, end_block) "
                              "VALUES ($1, $2, $3, $4, $5)", peer, f"0x{i + 1:040x}", MODEL_ID, start, end)
    live.model.script = Script(route=route)
    account_id, headers = await account(postgres_url)
    request_id = f"settle_{tag}"
    done = (await client.post(GENERATE, headers=headers, json={
        "prompt": "hello", "max_tokens": 8, "stream": False, "request_id": request_id})).json()
    prompt_tokens = done["usage"]["prompt_tokens"]
    assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 8
    assert Decimal(done["cost_far"]) == 8 * PRICE
    assert Decimal(done["fee_far"]) + sum(Decimal(c["payment_far"]) for c in done["contributions"]) == 8 * PRICE
    # metered like the Petals engine: the prompt's positions in the first step, one position per later step
    assert {c["peer_id"]: (c["blocks"], c["work_units"]) for c in done["contributions"]} == {
        peer: (f"{start}:{end}", (end - start) * (prompt_tokens + 7)) for peer, start, end in route}
    # equal work: each node gets half of the charge less the 10 % fee
    assert {c["payment_far"] for c in done["contributions"]} == {"0.00036"} and done["fee_far"] == "0.00008"
    session, paid = await assert_settled_once(db_pool, request_id, account_id, Decimal(1))
    assert sorted(r["payment_far"] for r in paid) == [Decimal("0.00036")] * 2
    await SessionStore(db_pool).sweep_stale(0)  # a sweep after settling changes nothing
    await assert_settled_once(db_pool, request_id, account_id, Decimal(1))
    whole = (await client.post(GENERATE, headers=headers, json={"prompt": "hello", "max_tokens": 64,
                                                                "stream": False})).json()
    assert whole["finish_reason"] == "eos" and whole["text"] == "hello world, hello mesh"


# ------------------------------------------------------------------------------------------- error mapping
@pytest.mark.parametrize("error, status, code", [
    (lambda: RuntimeError("hivemind.p2p.P2PDaemonError: peer QmSecretPeer at /ip4/10.0.0.7/tcp/31337 refused"),
     502, "swarm_error"),
    (lambda: SwarmUnavailable(2, 4), 503, "swarm_unavailable"),
], ids=["swarm_error", "swarm_unavailable"])
async def test_engine_failures_map_to_their_error_codes(live, client, postgres_url, db_pool, error, status, code):
    failover = {"peer_id": "QmScriptedB", "blocks": "2:4", "cause": "died", "error": "ServerStreamClosed()",
                "replaced_by": None, "stall_s": None}
    live.model.script = Script(fail_at=3, error=error, failover=failover)
    account_id, headers = await account(postgres_url)
    request_id = f"fail_{uuid.uuid4().hex[:8]}"
    payload = {"prompt": "hello", "max_tokens": 6, "stream": False, "request_id": request_id}
    response = await client.post(GENERATE, headers=headers, json=payload)
    body = response.json()["error"]
    assert response.status_code == status and body["code"] == code
    assert body["tokens_generated"] == 2 and body["cost_far"] == "0.0002"
    assert body["replaced_servers"] == [{k: failover[k] for k in ("peer_id", "blocks", "cause", "replaced_by")}
                                        | {"stall_ms": None}]
    if code == "swarm_unavailable":
        assert body["message"] == "blocks 2:4: no live server"
    for secret in ("QmSecretPeer", "10.0.0.7", "P2PDaemonError"):
        assert secret not in response.text
    session, _ = await assert_settled_once(db_pool, request_id, account_id, Decimal(1))
    assert session["status"] == "failed" and session["completion_tokens"] == 2
    again = await client.post(GENERATE, headers=headers, json=payload)  # reported, never replayed as a success
    assert again.status_code == 409 and again.json()["error"]["code"] == "request_failed"
    async with client.stream("POST", GENERATE, headers=headers, json={**payload, "request_id": None,
                                                                       "stream": True}) as streamed:
        events = [e async for e in asse_events(streamed)]
    assert [e["event"] for e in events] == ["message", "message", "error"]
    assert events[-1]["data"]["error"]["code"] == code


async def test_a_swarm_missing_blocks_is_refused_503_before_anything_is_charged(live, client, postgres_url, db_pool):
    account_id, headers = await account(postgres_url)
    live.readiness.servers = DEFAULT_ROUTE[:1]  # blocks 2 and 3 not served
    try:
        runs = len(live.model.started)
        response = await client.post(GENERATE, headers=headers, json={"prompt": "hello", "stream": False})
        models = (await client.get("/v1/models", headers=headers)).json()["data"]
    finally:
        live.readiness.servers = DEFAULT_ROUTE
    error = response.json()["error"]
    assert response.status_code == 503 and error["code"] == "swarm_not_ready" and error["missing_blocks"] == [2, 3]
    assert response.headers["Retry-After"] == "5" and len(live.model.started) == runs
    assert models == [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "far-mesh", "ready": False,
                       "missing_blocks": [2, 3], "loading_blocks": [], "fallback": False, "context_length": 256}]
    assert dict(await account_row(db_pool, account_id)) == {"balance_far": Decimal(1), "reserved_far": 0}


async def test_the_swarm_engine_runs_torch_on_TORCH_THREADS_threads(monkeypatch, tmp_path):
    """The coordinator's torch work (embeddings, LM head, sampling) uses TORCH_THREADS threads, set before the
    Petals client is built (torch's one-per-core default slowed every token beside local servers)."""
    import torch

    from services.common.config import CoordinatorSettings
    from services.coordinator import app as app_module, engine as engine_module

    seen = {}

    class StopHere(Exception):
        pass

    def fake_swarm_model(*_args, **_kwargs):
        seen["threads"] = torch.get_num_threads()
        raise StopHere

    monkeypatch.setattr(engine_module, "SwarmModel", fake_swarm_model)
    monkeypatch.setattr("services.models.catalog.resolve_model", lambda *_args, **_kwargs: str(tmp_path))
    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1
    try:
        with pytest.raises(StopHere):
            await app_module.swarm_engine(CoordinatorSettings(TORCH_THREADS=wanted), None)
        assert seen["threads"] == wanted
    finally:
        torch.set_num_threads(before)
    assert CoordinatorSettings().TORCH_THREADS == 1
    with pytest.raises(ValueError):
        CoordinatorSettings(TORCH_THREADS=0)

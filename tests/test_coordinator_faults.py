"""Faults the coordinator must survive: a swarm that is not ready, a provider SIGKILLed mid-stream, and the
coordinator itself SIGKILLed mid-stream and restarted."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import httpx
import pytest

from tests.fixtures.swarm import MODEL_ID, NUM_BLOCKS, asse_events, create_api_key, local_greedy, start_coordinator

pytestmark = pytest.mark.swarm

PROMPT = "def compute(a, b):"
PRICE = Decimal("0.0001")


async def _register(db_pool, nodes, wallets):
    for node in nodes:
        await db_pool.execute(
            "INSERT INTO far_nodes (peer_id, wallet_address, model_id, start_block, end_block) VALUES ($1,$2,$3,$4,$5)",
            node.peer_id, wallets[node.name], MODEL_ID, node.span.start, node.span.end)


async def test_not_ready_gate_then_replica_killed_mid_stream(fresh_swarm, tiny_model_dir, postgres_url, redis_url,
                                                             db_pool, local_model, tmp_path):
    _, key = await create_api_key(postgres_url)
    fresh_swarm.start_node("a", "0:2")
    fresh_swarm.wait_online(["a"], NUM_BLOCKS)
    coordinator = await asyncio.to_thread(
        start_coordinator, workdir=tmp_path / "coordinator", model_dir=tiny_model_dir,
        initial_peers=fresh_swarm.initial_peers, postgres_url=postgres_url, redis_url=redis_url, api_key=key,
        env_extra={"PETALS_REQUEST_TIMEOUT_S": "10", "SWARM_READINESS_REFRESH_S": "0.5"})
    try:
        async with httpx.AsyncClient(base_url=coordinator.url, headers=coordinator.headers, timeout=60) as client:
            # Blocks 2-3 are served by nobody: 503 at once, with the missing blocks and when to retry.
            not_ready = await client.post("/mesh/inference/generate", json={"prompt": PROMPT, "max_tokens": 8})
            assert not_ready.status_code == 503
            error = not_ready.json()["error"]
            assert error["code"] == "swarm_not_ready" and error["missing_blocks"] == [2, 3]
            assert "blocks 2-3" in error["message"] and int(not_ready.headers["Retry-After"]) > 0

            nodes = [fresh_swarm.nodes["a"], fresh_swarm.start_node("b", "2:4"), fresh_swarm.start_node("c", "2:4")]
            await _register(db_pool, nodes, {"a": "0x" + "a" * 40, "b": "0x" + "b" * 40, "c": "0x" + "c" * 40})
            await asyncio.to_thread(fresh_swarm.wait_online, ["a", "b", "c"], NUM_BLOCKS)

            async def ready():
                models = (await client.get("/v1/models")).json()["data"]
                return models[0]["ready"]

            deadline = time.monotonic() + 30
            while not await ready():
                assert time.monotonic() < deadline, "coordinator never saw the swarm ready"
                await asyncio.sleep(0.2)

            request_id = "failover_001"
            tokens, victim = [], None
            async with client.stream("POST", "/mesh/inference/generate", json={
                    "prompt": PROMPT, "max_tokens": 48, "temperature": 0, "request_id": request_id}) as response:
                events = []
                async for event in asse_events(response):
                    events.append(event["data"])
                    if event["data"].get("done"):
                        continue
                    tokens.append(event["data"]["token"])
                    if len(tokens) == 10:
                        route = (await client.get(f"/mesh/inference/{request_id}")).json()["route"]
                        on_route = {hop["peer_id"] for hop in route}
                        victim = next(n for n in ("b", "c") if fresh_swarm.nodes[n].peer_id in on_route)
                        await asyncio.to_thread(fresh_swarm.nodes[victim].process.kill)
            final = events[-1]
            status_after = (await client.get(f"/mesh/inference/{request_id}")).json()
    finally:
        await asyncio.to_thread(coordinator.process.stop)

    prompt_ids = coordinator_prompt_ids(tiny_model_dir)
    expected = local_greedy(local_model, prompt_ids, 48)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert final["finish_reason"] == "length"
    assert "".join(tokens) == final["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    # the final event and the session's status name the server replaced, why, and by whom (issue 14)
    survivor_peer = fresh_swarm.nodes["c" if victim == "b" else "b"].peer_id
    [replaced] = final["replaced_servers"]
    assert replaced["peer_id"] == fresh_swarm.nodes[victim].peer_id and replaced["blocks"] == "2:4"
    assert replaced["cause"] == "died" and replaced["replaced_by"] == survivor_peer
    assert 0 < replaced["stall_ms"] < 2000
    assert status_after["replaced_servers"] == final["replaced_servers"]

    session = await db_pool.fetchrow("SELECT * FROM far_mesh_sessions WHERE request_id = $1", request_id)
    rows = {r["peer_id"]: r for r in await db_pool.fetch(
        "SELECT * FROM far_session_contributions WHERE session_id = $1", session["session_id"])}
    survivor = "c" if victim == "b" else "b"
    killed = rows[fresh_swarm.nodes[victim].peer_id]
    replacement = rows[fresh_swarm.nodes[survivor].peer_id]
    first = rows[fresh_swarm.nodes["a"].peer_id]
    prompt_len = len(prompt_ids)
    # The killed server is credited only for the steps it served: prefill + (steps - 1) single positions.
    assert 10 <= killed["steps"] < 48
    assert killed["work_units"] == 2 * (prompt_len + killed["steps"] - 1)
    # The replacement did the rest, its first step replaying the processed prefix.
    assert replacement["steps"] == 48 - killed["steps"]
    assert replacement["work_units"] == 2 * (prompt_len + 47)
    assert first["steps"] == 48 and first["work_units"] == 2 * (prompt_len + 47)
    # Exact conservation, and the split by work.
    assert session["cost_far"] == 48 * PRICE
    assert session["fee_far"] + sum(r["payment_far"] for r in rows.values()) == session["cost_far"]


def coordinator_prompt_ids(model_dir) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(model_dir)(PROMPT).input_ids)


async def test_coordinator_killed_mid_stream_is_interrupted_and_billed_once(swarm, tiny_model_dir, postgres_url,
                                                                           redis_url, db_pool, tmp_path):
    account_id, key = await create_api_key(postgres_url, balance="5")
    env = {"FAR_MESH_COORDINATOR_ID": "coordinator-crash-test"}
    common = dict(workdir=tmp_path / "coordinator", model_dir=tiny_model_dir, initial_peers=swarm.initial_peers,
                  postgres_url=postgres_url, redis_url=redis_url, api_key=key, env_extra=env)
    coordinator = await asyncio.to_thread(start_coordinator, **common)
    request_id = "crash_001"
    received = 0
    try:
        async with httpx.AsyncClient(base_url=coordinator.url, headers=coordinator.headers, timeout=60) as client:
            async with client.stream("POST", "/mesh/inference/generate", json={
                    "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "request_id": request_id}) as response:
                try:
                    async for _ in asse_events(response):
                        received += 1
                        if received == 20:
                            await asyncio.to_thread(coordinator.process.kill)  # SIGKILL, whole tree
                except httpx.HTTPError:
                    pass  # the connection dies with the coordinator
    finally:
        await asyncio.to_thread(coordinator.process.stop)

    running = await db_pool.fetchrow("SELECT * FROM far_mesh_sessions WHERE request_id = $1", request_id)
    assert running["status"] == "running" and running["finalized_at"] is None
    checkpointed = running["completion_tokens"]
    assert 8 <= checkpointed <= received + 8  # checkpoints every 8 tokens: at most a few tokens are unbilled

    # Restart with the same coordinator id: the orphaned session is finalized as interrupted, billed once.
    restarted = await asyncio.to_thread(start_coordinator, **common)
    try:
        session = await db_pool.fetchrow("SELECT * FROM far_mesh_sessions WHERE request_id = $1", request_id)
        assert session["status"] == "interrupted"
        assert session["completion_tokens"] == checkpointed
        assert session["cost_far"] == checkpointed * PRICE
        payments = await db_pool.fetchval(
            "SELECT sum(payment_far) FROM far_session_contributions WHERE session_id = $1", session["session_id"])
        assert session["fee_far"] + payments == session["cost_far"]
        account = await db_pool.fetchrow("SELECT * FROM far_accounts WHERE account_id = $1::uuid", account_id)
        assert account["reserved_far"] == 0
        assert account["balance_far"] == Decimal("5") - session["cost_far"]
    finally:
        await asyncio.to_thread(restarted.process.stop)

    # A second restart changes nothing (finalization and settlement happened exactly once).
    again = await asyncio.to_thread(start_coordinator, **common)
    await asyncio.to_thread(again.process.stop)
    account_after = await db_pool.fetchrow("SELECT * FROM far_accounts WHERE account_id = $1::uuid", account_id)
    assert account_after["balance_far"] == account["balance_far"]

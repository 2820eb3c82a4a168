"""The first coordinator path end to end: SSE through a live swarm, session + contributions in Postgres."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest

from services.common.money import split_session
from tests.fixtures.swarm import local_greedy

pytestmark = pytest.mark.swarm


def _register(db_url_pool, peer_id: str, wallet: str, span):
    return db_url_pool.execute(
        "INSERT INTO far_nodes (peer_id, wallet_address, model_id, start_block, end_block) VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (peer_id) DO NOTHING",
        peer_id, wallet, "far-mesh/tiny-llama", span.start, span.end)


async def test_sse_stream_matches_local_model_and_contributions_add_up(coordinator, swarm, db_pool, local_model,
                                                                       swarm_client):
    wallets = {"a": "0x" + "a1" * 20, "b": "0x" + "b2" * 20}
    for name, node in swarm.nodes.items():
        await _register(db_pool, node.peer_id, wallets[name], node.span)

    events = coordinator.generate_stream({"prompt": "def compute(a, b):", "max_tokens": 24, "temperature": 0,
                                          "request_id": "test_sse_001"})
    tokens, final = events[:-1], events[-1]["data"]
    assert all(e["event"] == "message" for e in events)
    assert [e["data"]["tokens_generated"] for e in tokens] == list(range(1, 25))
    assert [Decimal(e["data"]["cost_far"]) for e in tokens] == [Decimal("0.0001") * i for i in range(1, 25)]
    assert final["done"] is True and final["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == 24

    prompt_ids = swarm_client.encode("def compute(a, b):")
    expected_text = swarm_client.tokenizer.decode(local_greedy(local_model, prompt_ids, 24), skip_special_tokens=True)
    assert "".join(e["data"]["token"] for e in tokens) == expected_text == final["text"]

    # Read back from Postgres: exact conservation and the split rule.
    session = await db_pool.fetchrow("SELECT * FROM far_mesh_sessions WHERE request_id = 'test_sse_001'")
    rows = await db_pool.fetch("SELECT * FROM far_session_contributions WHERE session_id = $1",
                               session["session_id"])
    cost = Decimal("0.0001") * 24
    assert session["status"] == "completed" and session["cost_far"] == cost
    payments = sum((r["payment_far"] for r in rows), Decimal(0))
    assert payments == cost - session["fee_far"]
    assert payments + session["fee_far"] == cost
    expected = split_session(cost, 1000, {r["peer_id"]: r["work_units"] for r in rows})
    assert {r["peer_id"]: r["payment_far"] for r in rows} == expected.payments
    by_wallet = {r["wallet_address"]: r for r in rows}
    assert set(by_wallet) == set(wallets.values())
    assert {r["blocks"] for r in rows} == {"0:2", "2:4"}
    assert all(r["work_units"] == 2 * (len(prompt_ids) + 23) for r in rows)
    assert [c["payment_far"] for c in final["contributions"]] == [str(r["payment_far"].normalize()) for r in
                                                                   sorted(rows, key=lambda r: r["blocks"])]


async def test_bad_input_gets_4xx_with_reason(coordinator):
    async with httpx.AsyncClient(base_url=coordinator.url, headers=coordinator.headers) as client:
        empty = await client.post("/mesh/inference/generate", json={"prompt": "   "})
        assert empty.status_code == 422 and "prompt is empty" in empty.json()["error"]["message"]
        too_many = await client.post("/mesh/inference/generate", json={"prompt": "x", "max_tokens": 10_000})
        assert too_many.status_code == 422 and "max_tokens" in too_many.json()["error"]["message"]
        long_prompt = await client.post("/mesh/inference/generate", json={"prompt": "word " * 400})
        assert long_prompt.status_code == 400 and long_prompt.json()["error"]["code"] == "prompt_too_long"
        unknown = await client.post("/mesh/inference/generate", json={"prompt": "x", "model_id": "nope/nope"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"

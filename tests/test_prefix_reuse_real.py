"""Prefix reuse on the default model (SmolLM2-135M-Instruct on a real 4-server swarm behind a real coordinator):
a chat's next turn continues the previous turn's session — also when a server on its route is killed in the
middle of it — with the same greedy answer as a full prefill (another account's request, which never reuses
it), only the new positions computed and paid, and the cached prompt tokens reported."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import httpx
import pytest

from tests.fixtures.swarm import create_api_key
from tests.fixtures.swarm import start_coordinator
from tests.test_real_model import _stream, real_swarm  # noqa: F401  (the module's swarm)

pytestmark = pytest.mark.swarm

PRICE = Decimal("0.0001")  # the coordinator's default PRICE_PER_TOKEN_FAR (prompt tokens free by default)


@pytest.fixture(scope="module")
def real_coordinator(real_swarm, smollm2_dir, postgres_url, redis_url, tmp_path_factory):  # noqa: F811
    """A coordinator on the SmolLM2 swarm with prefix reuse on (it is off by default)."""
    from services.models.catalog import SMOLLM2

    _, key = asyncio.run(create_api_key(postgres_url))
    coordinator = start_coordinator(workdir=tmp_path_factory.mktemp("reuse-coordinator"), model_dir=smollm2_dir,
                                    initial_peers=real_swarm.initial_peers, postgres_url=postgres_url,
                                    redis_url=redis_url, api_key=key, model_id=SMOLLM2.model_id,
                                    env_extra={"PETALS_REQUEST_TIMEOUT_S": "10", "PREFIX_REUSE_MAX_SESSIONS": "16"})
    yield coordinator
    coordinator.process.stop()


def _cached(usage: dict) -> int:
    return usage["prompt_tokens_details"]["cached_tokens"]


async def test_chat_turns_continue_the_session_through_a_failover(real_coordinator, real_swarm, postgres_url):
    _, other_key = await create_api_key(postgres_url)
    turn1 = [{"role": "user", "content": "What is the capital of France?"}]  # with the template's system prompt
    victim = []
    async with httpx.AsyncClient(base_url=real_coordinator.url, headers=real_coordinator.headers,
                                 timeout=300) as client:
        first = (await client.post("/v1/chat/completions", json={"messages": turn1, "max_tokens": 48,
                                                                 "temperature": 0})).json()
        answer1 = first["choices"][0]["message"]["content"]
        assert "Paris" in answer1 and _cached(first["usage"]) == 0
        turn2 = turn1 + [{"role": "assistant", "content": answer1}, {"role": "user", "content": "And of Spain?"}]

        async def kill_route_replica(count):
            if count != 3:
                return
            route = (await client.get("/mesh/inference/reuse_turn_2")).json()["route"]
            name = next(n for n in ("b", "d") if real_swarm.nodes[n].peer_id in {hop["peer_id"] for hop in route})
            victim.append(name)
            await asyncio.to_thread(real_swarm.nodes[name].process.kill)

        events = await _stream(client, {"messages": turn2, "max_tokens": 48, "temperature": 0,
                                        "request_id": "reuse_turn_2"}, on_token=kill_route_replica)
        second = events[-1]
        turn3 = turn2 + [{"role": "assistant", "content": second["text"]},
                         {"role": "user", "content": "And of Italy?"}]
        async with httpx.AsyncClient(base_url=real_coordinator.url, timeout=300,
                                     headers={"Authorization": f"Bearer {other_key}"}) as other:
            # another account, whose prompt continues the session this account has parked: a full prefill
            full3 = (await other.post("/v1/chat/completions", json={"messages": turn3, "max_tokens": 48,
                                                                    "temperature": 0})).json()
            third = (await client.post("/v1/chat/completions", json={"messages": turn3, "max_tokens": 48,
                                                                     "temperature": 0})).json()
            full = (await other.post("/v1/chat/completions", json={"messages": turn2, "max_tokens": 48,
                                                                   "temperature": 0})).json()

    assert victim, "no 10:20 server was on the route"
    assert [r["cause"] for r in second["replaced_servers"]] == ["died"]
    usage = second["usage"]
    # every position the first turn processed (its prompt and answer; the final <|im_end|> was never sent back)
    assert _cached(usage) == first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"] - 1
    # the other account computed the whole prompt: the same greedy answer
    assert _cached(full["usage"]) == 0
    assert full["choices"][0]["message"]["content"] == second["text"] != ""
    assert full["usage"]["completion_tokens"] == usage["completion_tokens"]
    # servers are paid for the positions they computed; the charge is unchanged (cached tokens are prompt tokens)
    new_positions = usage["prompt_tokens"] - _cached(usage) + usage["completion_tokens"] - 1
    units = {c["blocks"]: c["work_units"] for c in second["contributions"]}
    assert units["0:10"] == units["20:30"] == 10 * new_positions
    cost = Decimal(second["cost_far"])
    assert cost == usage["completion_tokens"] * PRICE
    assert sum(Decimal(c["payment_far"]) for c in second["contributions"]) + Decimal(second["fee_far"]) == cost
    # the session survived the failover and is continued again by the third turn
    assert _cached(third["usage"]) == usage["prompt_tokens"] + usage["completion_tokens"] - 1
    assert _cached(full3["usage"]) == 0
    assert third["choices"][0]["message"]["content"] == full3["choices"][0]["message"]["content"] != ""

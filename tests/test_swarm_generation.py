"""Generation through a real Petals swarm (bootstrap + servers as subprocesses) vs the local model."""

from __future__ import annotations

import pytest

from services.coordinator.engine_protocol import EngineGeneration, EngineModel
from services.coordinator.metering import WorkMeter
from services.coordinator.sampling import SamplingParams
from tests.fixtures.swarm import NUM_BLOCKS, local_greedy

pytestmark = pytest.mark.swarm

PROMPT = "def compute(a, b):"


def test_greedy_through_two_servers_equals_local_model(swarm_client, local_model):
    prompt_ids = swarm_client.encode(PROMPT)
    meter = WorkMeter()
    generation = swarm_client.start(prompt_ids, SamplingParams(max_tokens=40, temperature=0), meter)
    assert isinstance(swarm_client, EngineModel) and isinstance(generation, EngineGeneration)  # the serving seam
    tokens = [delta.token_id for delta in generation]

    assert tokens == local_greedy(local_model, prompt_ids, 40)
    assert generation.finish_reason == "length"
    # Work units: each server computed its 2 blocks for the prompt positions, then 1 position per new token
    # (the last sampled token is never sent back through the swarm).
    work = {w.blocks: w for w in meter.snapshot()}
    assert set(work) == {"0:2", "2:4"}
    for blocks in ("0:2", "2:4"):
        assert work[blocks].work_units == 2 * (len(prompt_ids) + 40 - 1)
        assert work[blocks].steps == 40


def test_replica_killed_mid_generation_output_identical(fresh_swarm, tiny_model_dir, local_model):
    """SIGKILL (the whole process tree) of the replica on the route after 12 tokens: the session fails over to
    the other replica, which replays the processed prefix, and the output stays token-for-token identical."""
    from services.coordinator.engine import SwarmModel

    fresh_swarm.start_node("a", "0:2")
    fresh_swarm.start_node("b", "2:4")
    fresh_swarm.start_node("c", "2:4")
    fresh_swarm.wait_online(["a", "b", "c"], NUM_BLOCKS)
    client = SwarmModel("far-mesh/tiny-llama", tiny_model_dir, fresh_swarm.initial_peers, request_timeout=10)
    try:
        prompt_ids = client.encode(PROMPT)
        meter = WorkMeter()
        generation = client.start(prompt_ids, SamplingParams(max_tokens=48, temperature=0), meter)
        tokens, victim = [], None
        for delta in generation:
            tokens.append(delta.token_id)
            if delta.index == 12:
                on_route = {hop["peer_id"] for hop in generation.route()}
                victim = next(n for n in ("b", "c") if fresh_swarm.nodes[n].peer_id in on_route)
                fresh_swarm.nodes[victim].process.kill()
        assert tokens == local_greedy(local_model, prompt_ids, 48)
        survivor = "c" if victim == "b" else "b"
        work = {w.peer_id: w for w in meter.snapshot()}
        killed, replacement = work[fresh_swarm.nodes[victim].peer_id], work[fresh_swarm.nodes[survivor].peer_id]
        # The killed server is credited only for the steps it served: prefill + 11 single-token steps.
        assert killed.steps == 12 and killed.work_units == 2 * (len(prompt_ids) + 11)
        # The replacement replayed the processed prefix (prompt + 11 tokens) plus the current token, then 35
        # more single-token steps.
        assert replacement.steps == 36
        assert replacement.work_units == 2 * (len(prompt_ids) + 12) + 2 * 35
        assert not fresh_swarm.nodes[victim].process.tree_pids() - {fresh_swarm.nodes[victim].process.pid}
    finally:
        client.shutdown()

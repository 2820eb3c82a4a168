"""Prefix reuse through a real Petals swarm (the toy model): the next turn continues the parked session, computes
only its new positions, and its greedy output is token-identical to the local model's (= without reuse); another
account never continues it; a server killed in the middle of a continued session changes nothing."""

from __future__ import annotations

import uuid

import pytest

from services.coordinator.metering import WorkMeter
from services.coordinator.sampling import SamplingParams
from tests.fixtures.swarm import MODEL_ID, NUM_BLOCKS, local_greedy

pytestmark = pytest.mark.swarm

PROMPT = "def compute(a, b):"


def _generate(client, prompt_ids, max_tokens, reuse_key, meter=None, on_token=None):
    generation = client.start(prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0), meter or WorkMeter(),
                              reuse_key=reuse_key)
    tokens = []
    for delta in generation:
        tokens.append(delta.token_id)
        if on_token is not None:
            on_token(generation, delta.index)
    return tokens, generation


@pytest.mark.skip(reason="fails in the full suite after other modules' swarms (not alone): under investigation, docs/prefix-reuse.md")
def test_next_turn_computes_only_new_positions_with_identical_output(swarm_client, local_model):
    alice, bob = f"alice-{uuid.uuid4()}", f"bob-{uuid.uuid4()}"
    prompt1 = swarm_client.encode(PROMPT)
    out1, first = _generate(swarm_client, prompt1, 12, alice)
    assert out1 == local_greedy(local_model, prompt1, 12) and first.cached_tokens == 0

    prompt2 = prompt1 + out1 + prompt1[1:5]  # the next turn: the history and a few new tokens
    meter = WorkMeter()
    out2, second = _generate(swarm_client, prompt2, 16, alice, meter)
    assert out2 == local_greedy(local_model, prompt2, 16)
    assert second.cached_tokens == len(prompt1) + 11  # every processed position (the last sampled token never is)
    new_positions = len(prompt2) - second.cached_tokens
    work = {w.blocks: w for w in meter.snapshot()}
    assert set(work) == {"0:2", "2:4"}
    for blocks in ("0:2", "2:4"):  # each server computed (and is paid for) the new positions only
        assert work[blocks].work_units == 2 * (new_positions + 15) and work[blocks].steps == 16

    prompt3 = prompt2 + out2 + prompt1[2:4]
    expected3 = local_greedy(local_model, prompt3, 8)
    out_bob, by_bob = _generate(swarm_client, prompt3, 8, bob)  # another account: never alice's session
    assert by_bob.cached_tokens == 0 and out_bob == expected3
    out_anonymous, anonymous = _generate(swarm_client, prompt3, 8, None)
    assert anonymous.cached_tokens == 0 and out_anonymous == expected3
    out_alice, by_alice = _generate(swarm_client, prompt3, 8, alice)  # alice's session was still parked
    assert by_alice.cached_tokens == len(prompt2) + 15 and out_alice == expected3


@pytest.mark.skip(reason="fails in the full suite after other modules' swarms (not alone): under investigation, docs/prefix-reuse.md")
def test_a_prompt_that_does_not_continue_a_parked_session_is_a_full_prefill(swarm_client, local_model):
    carol = f"carol-{uuid.uuid4()}"
    prompt1 = swarm_client.encode(PROMPT)
    out1, _ = _generate(swarm_client, prompt1, 6, carol)
    diverging = prompt1 + [out1[0] + 1] + prompt1[1:3]  # differs from the processed tokens at one position
    out, generation = _generate(swarm_client, diverging, 6, carol)
    assert generation.cached_tokens == 0 and out == local_greedy(local_model, diverging, 6)
    # the first session is still parked (the miss opened another): its continuation is found
    continuing = prompt1 + out1 + prompt1[1:3]
    out, generation = _generate(swarm_client, continuing, 6, carol)
    assert generation.cached_tokens == len(prompt1) + 5 and out == local_greedy(local_model, continuing, 6)


def test_server_killed_in_a_continued_session_keeps_the_output_identical(fresh_swarm, tiny_model_dir, local_model):
    """The replica of blocks 2:4 on the route is SIGKILLed in the middle of the second turn (a continued session):
    the other replica replays every processed position, the reused ones included (that work is done again and
    paid), the output stays the local model's, and the third turn still continues the session."""
    from services.coordinator.engine import SwarmModel

    fresh_swarm.start_node("a", "0:2")
    fresh_swarm.start_node("b", "2:4")
    fresh_swarm.start_node("c", "2:4")
    fresh_swarm.wait_online(["a", "b", "c"], NUM_BLOCKS)
    client = SwarmModel(MODEL_ID, tiny_model_dir, fresh_swarm.initial_peers, request_timeout=10,
                         prefix_reuse={"max_sessions": 16})
    alice, victim = "alice", []
    try:
        prompt1 = client.encode(PROMPT)
        out1, _ = _generate(client, prompt1, 12, alice)
        prompt2 = prompt1 + out1 + prompt1[1:5]

        def kill_route_replica(generation, index):
            if index == 5:
                on_route = {hop["peer_id"] for hop in generation.route()}
                victim.append(next(n for n in ("b", "c") if fresh_swarm.nodes[n].peer_id in on_route))
                fresh_swarm.nodes[victim[0]].process.kill()

        meter = WorkMeter()
        out2, second = _generate(client, prompt2, 16, alice, meter, kill_route_replica)
        assert out2 == local_greedy(local_model, prompt2, 16)
        cached = second.cached_tokens
        assert cached == len(prompt1) + 11 and victim
        survivor = "c" if victim[0] == "b" else "b"
        work = {w.peer_id: w for w in meter.snapshot()}
        killed, replacement = work[fresh_swarm.nodes[victim[0]].peer_id], work[fresh_swarm.nodes[survivor].peer_id]
        assert killed.steps == 5 and killed.work_units == 2 * (len(prompt2) - cached + 4)
        # the replacement replayed all processed positions (prompt2 + 4 tokens) with the current one, then 10 more
        assert replacement.steps == 11 and replacement.work_units == 2 * (len(prompt2) + 5) + 2 * 10
        assert [e["cause"] for e in second.failovers] == ["died"]

        prompt3 = prompt2 + out2 + prompt1[2:4]
        out3, third = _generate(client, prompt3, 8, alice)
        assert third.cached_tokens == len(prompt2) + 15 and out3 == local_greedy(local_model, prompt3, 8)
    finally:
        client.shutdown()
    assert len(client.parked) == 0  # shutdown closed the parked sessions

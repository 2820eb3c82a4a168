"""Structured outputs (services/coordinator/structured.py): the grammar compiled from a JSON schema masks the logits
in the coordinator's sampler, so the output parses and validates whatever the model prefers. Fast: the real app
(uvicorn in a thread, real PostgreSQL and Redis) over the scripted engine, whose script here is a model emitting
logits; the official ``openai`` client, unmodified."""

from __future__ import annotations

import asyncio
import json
import uuid
from decimal import Decimal
from typing import Literal

import httpx
import jsonschema_rs
import openai
import pydantic
import pytest
import torch

from services.common.config import Settings
from services.coordinator.sampling import SamplingParams, TokenSampler
from services.coordinator.structured import GrammarConstraint, UnsupportedSchema, grammar_for_schema
from tests.fixtures.swarm import create_api_key
from tests.scripted_engine import Script, ScriptedModel, ScriptedReadiness, scripted_engine, serve_app

MODEL_ID = "test/structured"

CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12},
                   "rank": {"type": "integer", "minimum": 0, "maximum": 99},
                   "capital": {"type": "boolean"},
                   "tags": {"type": "array", "items": {"enum": ["old", "big", "cold"]}, "maxItems": 3}},
    "required": ["city", "rank", "capital", "tags"],
    "additionalProperties": False,
}
# What the scripted model would say unconstrained: not JSON at all.
FREE_TEXT = 'Sure! The answer is {city: Paris, rank: first} as you asked.'


def preferring(tokenizer, text: str, *, seed: int = 0, bonus: float = 8.0):
    """A model whose logits favour the tokens of ``text`` in order, then the end of text (and seeded noise
    elsewhere)."""
    target = tokenizer(text, add_special_tokens=False).input_ids
    if tokenizer.convert_ids_to_tokens(target[0]) == "\u2581":  # SentencePiece's prefix space: not in the text
        target = target[1:]
    target.append(tokenizer.eos_token_id)
    vocab = len(tokenizer)

    def logits(generated: list) -> torch.Tensor:
        position = len(generated)
        noise = torch.randn(vocab, generator=torch.Generator().manual_seed(seed * 100_003 + position))
        if position < len(target):
            noise[target[position]] += bonus
        return noise

    return logits


def sample_constrained(tokenizer, grammar: str, logits_of, *, max_tokens: int = 120, temperature: float = 0.0,
                       seed: int = 0) -> tuple[str, list[int]]:
    eos = tokenizer.eos_token_id
    sampler = TokenSampler(SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed),
                           constraint=GrammarConstraint(tokenizer, grammar, [eos]))
    ids: list[int] = []
    while len(ids) < max_tokens:
        token = sampler.sample(logits_of(ids))
        if token == eos:
            break
        ids.append(token)
    return tokenizer.decode(ids, skip_special_tokens=True), ids


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# ------------------------------------------------------------------------------------------------- pure
def test_unsupported_schema_features_are_named():
    with pytest.raises(UnsupportedSchema, match="uniqueItems"):
        grammar_for_schema({"type": "array", "uniqueItems": True})
    with pytest.raises(UnsupportedSchema, match='"if", "then"'):
        grammar_for_schema({"if": {"type": "string"}, "then": {"minLength": 2}})
    with pytest.raises(UnsupportedSchema, match="look-around"):
        grammar_for_schema({"type": "string", "pattern": "a(?=b)"})
    with pytest.raises(UnsupportedSchema, match="JSON object"):
        grammar_for_schema(["not", "a", "schema"])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constrained_sampling_always_validates(tokenizer, seed, temperature):
    """Whatever the model prefers (free text here, noise after it), the sampled text is valid JSON of the schema;
    the same logits unconstrained give text that is not JSON."""
    grammar = grammar_for_schema(CITY_SCHEMA)
    model = preferring(tokenizer, FREE_TEXT, seed=seed)
    text, _ = sample_constrained(tokenizer, grammar, model, temperature=temperature, seed=seed)
    jsonschema_rs.validate(CITY_SCHEMA, json.loads(text))
    unconstrained = TokenSampler(SamplingParams(temperature=0.0))
    first = [unconstrained.sample(model(list(range(i)))) for i in range(8)]
    with pytest.raises(json.JSONDecodeError):
        json.loads(tokenizer.decode(first))


def test_a_valid_preference_is_followed_exactly(tokenizer):
    """A model that already says valid JSON (compact) is not changed by the mask."""
    wanted = '{"city":"Oslo","rank":7,"capital":true,"tags":["cold","old"]}'
    text, _ = sample_constrained(tokenizer, grammar_for_schema(CITY_SCHEMA), preferring(tokenizer, wanted))
    assert text == wanted


def test_mask_follows_only_accepted_tokens(tokenizer):
    """Two streams over one grammar keep their own state (one constraint each)."""
    grammar = grammar_for_schema(CITY_SCHEMA)
    a, _ = sample_constrained(tokenizer, grammar, preferring(tokenizer, '{"city":"A"', seed=1))
    b, _ = sample_constrained(tokenizer, grammar, preferring(tokenizer, '{"city":"Bergen"', seed=2))
    assert a.startswith('{"city":"A"') and b.startswith('{"city":"Bergen"')
    for text in (a, b):
        jsonschema_rs.validate(CITY_SCHEMA, json.loads(text))


def test_smollm2_token_table_and_both_end_tokens(smollm2_dir):
    """The default model's byte-level BPE tokenizer (transformers 4.34 / tokenizers 0.14) builds a token table; a
    complete answer allows each of the model's end-of-generation tokens, and nothing else."""
    from transformers import AutoTokenizer, GenerationConfig

    from services.coordinator.engine import end_of_generation_ids

    smol = AutoTokenizer.from_pretrained(smollm2_dir)
    eos = end_of_generation_ids(smol, GenerationConfig.from_pretrained(smollm2_dir))
    wanted = '{"city":"Lima","rank":3,"capital":true,"tags":["old"]}'
    constraint = GrammarConstraint(smol, grammar_for_schema(CITY_SCHEMA), eos)
    for token in smol(wanted, add_special_tokens=False).input_ids:
        assert token in set(constraint.allowed_ids(len(smol)).tolist())
        constraint.accept(token)
    assert constraint.complete and set(constraint.allowed_ids(len(smol)).tolist()) == set(eos) and len(eos) >= 1


# ------------------------------------------------------------------------------------------ through the API
@pytest.fixture(scope="module")
def live(tokenizer, postgres_url, redis_url):
    from services.coordinator.app import create_app

    model = ScriptedModel(MODEL_ID, tokenizer, context_length=256)
    readiness = ScriptedReadiness(MODEL_ID)
    settings = Settings(POSTGRES_URL=postgres_url, REDIS_URL=redis_url, DEFAULT_MODEL_ID=MODEL_ID, JWT_SECRET="",
                        PRICE_PER_TOKEN_FAR=Decimal("0.0001"), PRICE_PER_PROMPT_TOKEN_FAR=Decimal(0),
                        GENERATION_TIMEOUT_S=60)
    app = create_app(settings, coordinator_id=f"structured-{uuid.uuid4().hex[:6]}",
                     engine_factory=scripted_engine(model, readiness))
    with serve_app(app, "structured-coordinator") as url:
        _, key = asyncio.run(create_api_key(postgres_url, balance="100"))
        yield url, key, model


@pytest.fixture
def client(live):
    url, key, model = live
    model.script = Script(logits=preferring(model.tokenizer, FREE_TEXT, seed=3))
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


ASK = [{"role": "user", "content": "Name a city as JSON."}]


def test_chat_json_schema_validates(client):
    answer = client.chat.completions.create(
        model=MODEL_ID, messages=ASK, max_tokens=120, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA,
                                                                "strict": True}})
    choice = answer.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema_rs.validate(CITY_SCHEMA, json.loads(choice.message.content))


def test_chat_json_object_streamed(client, live):
    """json_object: any JSON object. The model's text (a JSON object after a preamble) is cut to the object."""
    live[2].script = Script(logits=preferring(live[2].tokenizer, 'Here: {"city": "Oslo", "n": [1, 2]}'))
    stream = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=200, temperature=0,
                                            stream=True, response_format={"type": "json_object"})
    chunks = [chunk for chunk in stream if chunk.choices]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert isinstance(json.loads(text), dict) and chunks[-1].choices[0].finish_reason == "stop"


class City(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=12)
    size: Literal["small", "large"]
    capital: bool


def test_official_client_parse_returns_the_model(client):
    completion = client.beta.chat.completions.parse(model=MODEL_ID, messages=ASK, max_tokens=120, temperature=0,
                                                    response_format=City)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City)


def test_unsupported_schema_is_a_400_naming_it(client, live):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL_ID, messages=ASK, max_tokens=20,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "array", "uniqueItems": True}}})
    assert refused.value.body["code"] == "unsupported_schema" and "uniqueItems" in refused.value.body["message"]
    url, key, _ = live
    native = httpx.post(f"{url}/mesh/inference/generate", headers={"Authorization": f"Bearer {key}"}, json={
        "prompt": "x", "stream": False, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"not": {"type": "string"}}}}}, timeout=30)
    assert native.status_code == 400 and '"not"' in native.json()["error"]["message"]


def test_native_generate_response_format(live):
    url, key, model = live
    model.script = Script(logits=preferring(model.tokenizer, FREE_TEXT, seed=4))
    answer = httpx.post(f"{url}/mesh/inference/generate", headers={"Authorization": f"Bearer {key}"}, json={
        "prompt": "A city:", "stream": False, "max_tokens": 120, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}}},
        timeout=30)
    assert answer.status_code == 200, answer.text
    jsonschema_rs.validate(CITY_SCHEMA, json.loads(answer.json()["text"]))
    bad = httpx.post(f"{url}/mesh/inference/generate", headers={"Authorization": f"Bearer {key}"}, json={
        "prompt": "A city:", "stream": False, "response_format": {"type": "json_schema"}}, timeout=30)
    assert bad.status_code == 422


# ------------------------------------------------------------------------------------------------ the swarm
@pytest.mark.swarm
def test_swarm_output_parses_and_validates(coordinator):
    """The toy model (random weights) through a real swarm and the coordinator process: sampled at temperature 1,
    its answers are still JSON valid against the schema."""
    from tests.fixtures.swarm import MODEL_ID as TINY

    client = openai.OpenAI(base_url=f"{coordinator.url}/v1", api_key=coordinator.api_key, max_retries=0)
    for seed in range(3):
        answer = client.chat.completions.create(
            model=TINY, messages=ASK, max_tokens=160, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA,
                                                                    "strict": True}})
        assert answer.choices[0].finish_reason == "stop"
        jsonschema_rs.validate(CITY_SCHEMA, json.loads(answer.choices[0].message.content))


@pytest.mark.swarm
def test_swarm_failover_keeps_the_output_valid_and_unchanged(fresh_swarm, tiny_model_dir):
    """A server dies mid-step during a constrained generation: the session replays on a replica (no token is
    re-sampled), so the grammar state stays exact: the answer is the uninterrupted run's, and it validates."""
    import os
    import signal
    import threading

    from services.coordinator.engine import SwarmModel
    from services.coordinator.metering import WorkMeter
    from services.coordinator.sampling import SamplingParams
    from tests.fixtures.swarm import MODEL_ID as TINY
    from tests.fixtures.swarm import NUM_BLOCKS

    for name, span in (("a1", "0:2"), ("b1", "2:4"), ("b2", "2:4")):
        fresh_swarm.start_node(name, span)
    fresh_swarm.wait_online(list(fresh_swarm.nodes), NUM_BLOCKS)
    client = SwarmModel(TINY, tiny_model_dir, fresh_swarm.initial_peers, update_period=2, request_timeout=30)
    params = SamplingParams(max_tokens=160, temperature=0, grammar=grammar_for_schema(CITY_SCHEMA))
    prompt = client.encode("A city as JSON:")
    try:
        reference = list(client.start(prompt, params, WorkMeter()))
        generation = client.start(prompt, params, WorkMeter())
        deltas = []
        for delta in generation:
            deltas.append(delta)
            if delta.index == 3:  # freeze the 2:4 server so the next step is in flight when the kill lands
                route = {hop["blocks"]: hop["peer_id"] for hop in generation.route()}
                node = next(n for n in fresh_swarm.nodes.values() if n.peer_id == route["2:4"])
                os.killpg(node.process.pid, signal.SIGSTOP)
                threading.Timer(0.5, node.process.kill).start()
    finally:
        client.shutdown()
    assert [e["cause"] for e in generation.failovers] == ["died"]
    assert [d.token_id for d in deltas] == [d.token_id for d in reference]
    jsonschema_rs.validate(CITY_SCHEMA, json.loads("".join(d.text for d in deltas)))

"""The sampler (services/coordinator/sampling.py) over the whole accepted range of temperature / top_p / top_k
(protocol.GenerateRequest), with extreme logits: never an exception, always a valid token."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.coordinator.protocol import GenerateRequest
from services.coordinator.sampling import GREEDY_BELOW_TEMPERATURE, SamplingParams, TokenSampler

_fields = GenerateRequest.model_fields
TEMPERATURE = st.floats(min_value=0.0, max_value=2.0, allow_subnormal=True)
TOP_P = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, allow_subnormal=True)
TOP_K = st.integers(min_value=0, max_value=100_000)
EXTREME = st.floats(width=32, allow_nan=True, allow_infinity=True) | st.sampled_from(
    [3.4e38, -3.4e38, 1e-45, -1e-45, 0.0, float("inf"), float("-inf"), float("nan")])
LOGITS = st.lists(EXTREME, min_size=1, max_size=48)


def test_the_strategies_cover_the_accepted_range():
    for value in (0.0, 1e-300, 2.0):
        GenerateRequest(prompt="x", temperature=value)
    GenerateRequest(prompt="x", top_p=5e-324, top_k=100_000)
    GenerateRequest(prompt="x", top_p=1.0, top_k=0)


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324, GREEDY_BELOW_TEMPERATURE / 2])
def test_tiny_temperatures_are_greedy(temperature):
    GenerateRequest(prompt="x", temperature=temperature)  # schema-valid
    logits = torch.randn(512, generator=torch.Generator().manual_seed(1)) * 10
    sampler = TokenSampler(SamplingParams(temperature=temperature, top_p=0.9, top_k=40, seed=3))
    assert [sampler.sample(logits) for _ in range(5)] == [int(torch.argmax(logits))] * 5


@settings(max_examples=400, deadline=None)
@given(logits=LOGITS, temperature=TEMPERATURE, top_p=TOP_P, top_k=TOP_K, seed=st.integers(0, 2**63 - 1))
def test_any_accepted_parameters_and_extreme_logits_give_a_valid_token(logits, temperature, top_p, top_k, seed):
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    token = TokenSampler(params).sample(torch.tensor(logits, dtype=torch.float32))
    assert 0 <= token < len(logits)
    values = [float("-inf") if math.isnan(v) else float(torch.tensor(v, dtype=torch.float32)) for v in logits]
    if params.greedy:
        assert values[token] == max(values)
    elif any(v == float("inf") for v in values):
        assert values[token] == float("inf")
    elif any(math.isfinite(v) for v in values):
        assert math.isfinite(values[token])  # never a -inf (masked) or NaN token
    assert TokenSampler(params).sample(torch.tensor(logits, dtype=torch.float32)) == token  # same seed, same token


@settings(max_examples=200, deadline=None)
@given(data=st.data(), temperature=st.floats(min_value=GREEDY_BELOW_TEMPERATURE, max_value=2.0),
       top_k=st.integers(min_value=0, max_value=40), top_p=TOP_P)
def test_top_k_is_respected(data, temperature, top_k, top_p):
    logits = data.draw(st.lists(st.integers(-1000, 1000), min_size=1, max_size=40, unique=True))
    token = TokenSampler(SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=0)).sample(
        torch.tensor(logits, dtype=torch.float32))
    if top_k:
        assert logits[token] >= sorted(logits, reverse=True)[min(top_k, len(logits)) - 1]

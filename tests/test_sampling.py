"""The sampler (services/coordinator/sampling.py) over the whole accepted range of temperature / top_p / top_k
(protocol.GenerateRequest), with extreme logits: never an exception, always a valid token."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.coordinator.protocol import GenerateRequest
from services.coordinator.sampling import GREEDY_BELOW_TEMPERATURE, SamplingParams, TextStream, TokenSampler

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


# ------------------------------------------------------------------------------------ detokenizer (TextStream)
@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from services.common import petals_adapter  # noqa: F401  (before transformers)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


class CountingTokenizer:
    """Delegates to a tokenizer and counts the token ids passed to ``decode``."""

    def __init__(self, tokenizer):
        self._tokenizer, self.decode_calls, self.decoded_tokens = tokenizer, 0, 0

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def decode(self, ids, **kwargs):
        self.decode_calls += 1
        self.decoded_tokens += len(ids)
        return self._tokenizer.decode(ids, **kwargs)


def _full(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _run(tokenizer, ids, stop=()):
    """What a generation emits: push every token until stopped, then flush. (deltas, tokens pushed, stream)"""
    stream = TextStream(tokenizer, stop)
    deltas, pushed = [], 0
    for token_id in ids:
        deltas.append(stream.push(token_id))
        pushed += 1
        assert stream.emitted == "".join(deltas)
        if stream.stopped:
            break
    deltas.append(stream.flush())
    return deltas, ids[:pushed], stream


def _token_lists(tokenizer):
    byte_ids = [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)]
    special = sorted(tokenizer.all_special_ids)
    text = st.text(alphabet=st.characters(codec="utf-8"), max_size=12).map(
        lambda t: tokenizer(t, add_special_tokens=False).input_ids)
    one = st.one_of(st.integers(0, len(tokenizer) - 1).map(lambda i: [i]), st.sampled_from(byte_ids).map(lambda i: [i]),
                    st.sampled_from(special).map(lambda i: [i]), text)
    return st.lists(one, max_size=24).map(lambda parts: [i for part in parts for i in part])


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_streamed_text_is_the_full_decode_cut_at_the_first_stop(tokenizer, data):
    ids = data.draw(_token_lists(tokenizer), label="ids")
    full = _full(tokenizer, ids)
    substrings = st.nothing()
    if full:
        start = data.draw(st.integers(0, len(full) - 1))
        substrings = st.integers(start + 1, min(len(full), start + 6)).map(lambda end: full[start:end])
    stop = data.draw(st.lists(st.text(min_size=1, max_size=4) | substrings, max_size=3), label="stop")
    deltas, pushed, stream = _run(tokenizer, ids, stop)
    text = _full(tokenizer, pushed)
    found = [text.find(s) for s in stop if text.find(s) != -1]
    if stream.stopped:
        assert found and "".join(deltas) == text[:min(found)]
    else:
        assert not found and "".join(deltas) == text == full
    for s in stop:  # never emitted, not even partly at the end of a stopped stream
        assert s not in "".join(deltas)


def test_incomplete_utf8_is_held_back_and_byte_runs_are_decoded_whole(tokenizer):
    euro = [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "€".encode()]
    stray = tokenizer.convert_tokens_to_ids("<0x80>")
    word = tokenizer("ab", add_special_tokens=False).input_ids
    stream = TextStream(tokenizer)
    assert [stream.push(i) for i in word + euro[:2]][-2:] == ["", ""]
    # a later stray byte makes Hugging Face decode the whole run as U+FFFD: nothing was emitted from it early
    deltas = [stream.push(i) for i in [euro[2], stray] + word]
    assert stream.emitted + stream.flush() == _full(tokenizer, word + euro + [stray] + word)
    assert "€" not in "".join(deltas)


def test_detokenizing_is_linear_in_the_output_length(tokenizer):
    """2,000 tokens with 8 stop strings of 256 characters: the tokens decoded grow linearly (the old full
    decode per token decoded n²/2 ≈ 2,000,000 of them)."""
    import inspect

    import services.coordinator.sampling as sampling

    source = inspect.getsource(sampling) * 20
    ids = tokenizer(source, add_special_tokens=False).input_ids[:2000]
    assert len(ids) == 2000
    stop = [f"{i}" * 255 + "\x00" for i in range(8)]  # never found; 255-char prefixes share the text's digits
    counting = CountingTokenizer(tokenizer)
    deltas, pushed, stream = _run(counting, ids, stop)
    assert len(pushed) == 2000 and "".join(deltas) == _full(tokenizer, ids)
    assert counting.decoded_tokens <= 8 * len(ids), counting.decoded_tokens
    assert counting.decode_calls <= 3 * len(ids)
    assert stream.decoded_tokens == counting.decoded_tokens


def test_stop_strings_are_capped_with_a_reason():
    from pydantic import ValidationError

    GenerateRequest(prompt="x", stop=["a" * 256] * 8)
    with pytest.raises(ValidationError, match="at most 256 characters"):
        GenerateRequest(prompt="x", stop=["a" * 257])


class ByteLevelTokenizer:
    """GPT-2-like: each token is one byte, decoded with ``errors="replace"`` (no byte-fallback pieces)."""

    all_special_ids = [256]

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return bytes(i for i in ids if i != 256).decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, token_id):
        return f"b{token_id}"


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, 256) | st.sampled_from([0x80, 0xC3, 0xE2, 0xF0, 0xA9, 0x82]), max_size=60),
       stop=st.lists(st.text(min_size=1, max_size=3), max_size=2))
def test_byte_level_tokenizer_and_runs_of_invalid_bytes(ids, stop):
    tokenizer = CountingTokenizer(ByteLevelTokenizer())
    deltas, pushed, stream = _run(tokenizer, ids, stop)
    text = _full(tokenizer, pushed)
    found = [text.find(s) for s in stop if text.find(s) != -1]
    assert "".join(deltas) == (text[:min(found)] if stream.stopped else text)
    assert tokenizer.decoded_tokens <= 40 * max(1, len(pushed))  # invalid bytes do not grow the window


def test_invalid_bytes_forever_are_released_with_a_bounded_window():
    tokenizer = CountingTokenizer(ByteLevelTokenizer())
    deltas, _, _ = _run(tokenizer, [0x80] * 2000)
    assert "".join(deltas) == "\ufffd" * 2000
    assert tokenizer.decoded_tokens <= 40 * 2000


def test_accept_is_the_finish_rule_of_every_engine(tokenizer):
    """TextStream.accept: the text a token adds and the finish reason it causes (engine.py and the scripted
    engine both follow it)."""
    ids = tokenizer("hello world, hello again").input_ids[1:]
    stream = TextStream(tokenizer)
    outcomes = [stream.accept(t, count=i + 1, max_tokens=len(ids), end_of_generation=False) for i, t in enumerate(ids)]
    assert [finish for _, finish in outcomes] == [None] * (len(ids) - 1) + ["length"]
    assert "".join(delta for delta, _ in outcomes) == _full(tokenizer, ids)  # nothing held back after the last

    stream = TextStream(tokenizer)
    stream.accept(ids[0], count=1, max_tokens=10, end_of_generation=False)
    eos = tokenizer.eos_token_id
    delta, finish = stream.accept(eos, count=2, max_tokens=10, end_of_generation=True)
    assert finish == "eos" and eos not in stream.token_ids  # the end token is not text

    stop = _full(tokenizer, ids[:3])[-3:]
    stream = TextStream(tokenizer, [stop])
    finishes = [stream.accept(t, count=i + 1, max_tokens=100, end_of_generation=False)[1] for i, t in enumerate(ids)
                if not stream.stopped]
    assert finishes[-1] == "stop" and stop not in stream.emitted

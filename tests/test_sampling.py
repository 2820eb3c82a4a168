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


# ------------------------------------------------------------------------ bias and penalties, against references
def _openai_penalized(logits: list[float], output: list[int], presence: float, frequency: float) -> list[float]:
    """OpenAI's documented formula: mu[j] - c[j] * alpha_frequency - (c[j] > 0) * alpha_presence, c counting the
    tokens generated so far."""
    counts = {j: output.count(j) for j in set(output)}
    return [value - counts.get(j, 0) * frequency - (counts.get(j, 0) > 0) * presence
            for j, value in enumerate(logits)]


@settings(max_examples=100, deadline=None)
@given(logits=st.lists(st.floats(-50, 50), min_size=2, max_size=40), data=st.data(),
       presence=st.floats(-2, 2), frequency=st.floats(-2, 2))
def test_presence_and_frequency_penalties_are_openais_formula(logits, data, presence, frequency):
    output = data.draw(st.lists(st.integers(0, len(logits) - 1), max_size=12))
    sampler = TokenSampler(SamplingParams(presence_penalty=presence, frequency_penalty=frequency, seed=0))
    for token_id in output:  # what the sampler counts as generated
        sampler.output_counts[token_id] = sampler.output_counts.get(token_id, 0) + 1
    got = sampler._processed(torch.tensor(logits, dtype=torch.float64))
    assert got.tolist() == pytest.approx(_openai_penalized(logits, output, presence, frequency), abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(logits=st.lists(st.floats(-50, 50, width=32), min_size=2, max_size=40), data=st.data(),
       penalty=st.floats(0.05, 10))
def test_repetition_penalty_is_transformers_processor_over_prompt_and_output(logits, data, penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    prompt = data.draw(st.lists(st.integers(0, len(logits) - 1), max_size=8))
    output = data.draw(st.lists(st.integers(0, len(logits) - 1), max_size=8))
    sampler = TokenSampler(SamplingParams(repetition_penalty=penalty, seed=0), prompt)
    sampler.seen.update(output)
    got = sampler._processed(torch.tensor(logits, dtype=torch.float64))
    scores = torch.tensor([logits], dtype=torch.float64)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + output], dtype=torch.long), scores)
    assert got.tolist() == pytest.approx(expected[0].tolist(), rel=1e-12, abs=1e-12)


def test_the_sampler_counts_what_it_samples_and_bias_steers_greedy():
    logits = torch.tensor([5.0, 4.9, 1.0, 0.0])
    plain = TokenSampler(SamplingParams(temperature=0))
    assert [plain.sample(logits) for _ in range(3)] == [0, 0, 0]
    # frequency 0.06 per occurrence: token 0 drops below token 1 after two samples
    penalized = TokenSampler(SamplingParams(temperature=0, frequency_penalty=0.06))
    assert [penalized.sample(logits) for _ in range(3)] == [0, 0, 1]
    assert penalized.output_counts == {0: 2, 1: 1}
    # the repetition penalty also counts the prompt: 5.0 / 1.1 < 4.9
    assert TokenSampler(SamplingParams(temperature=0, repetition_penalty=1.1), prompt_ids=[0]).sample(logits) == 1
    biased = TokenSampler(SamplingParams(temperature=0, logit_bias=((3, 100.0), (0, -100.0))))
    assert biased.sample(logits) == 3
    banned = TokenSampler(SamplingParams(temperature=1.0, seed=1, logit_bias=((0, -100.0), (1, -100.0))))
    assert all(banned.sample(logits) in (2, 3) for _ in range(50))


# ---------------------------------------------------------------------------------------------------- logprobs
@settings(max_examples=100, deadline=None)
@given(logits=st.lists(st.floats(-80, 80, width=32), min_size=1, max_size=64), data=st.data())
def test_logprobs_are_the_log_softmax_of_the_raw_logits(logits, data):
    top = data.draw(st.integers(0, 20))
    params = SamplingParams(temperature=data.draw(st.sampled_from([0.0, 0.7])), seed=0, logprobs=top,
                            presence_penalty=1.0, logit_bias=((0, 5.0),))
    sampler = TokenSampler(params)
    token = sampler.sample(torch.tensor(logits))
    reference = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), dim=-1)
    entry = sampler.last_logprob
    assert entry.token_id == token and math.isclose(entry.logprob, float(reference[token]), abs_tol=1e-12)
    assert len(entry.top) == min(top, len(logits))
    assert [value for _, value in entry.top] == sorted(reference.tolist(), reverse=True)[:len(entry.top)]


def test_logprobs_of_impossible_tokens_are_finite_json_numbers():
    entry = TokenSampler(SamplingParams(temperature=0, logprobs=2)).sample(torch.tensor([0.0, float("-inf")]))
    assert entry == 0
    from services.coordinator.sampling import MIN_LOGPROB, token_logprob

    assert token_logprob(torch.tensor([0.0, float("-inf")], dtype=torch.float64), 1, 2).logprob == MIN_LOGPROB
    inf = token_logprob(torch.tensor([float("inf"), float("inf"), 1.0], dtype=torch.float64), 0, 3)
    assert inf.logprob == pytest.approx(math.log(0.5)) and inf.top[-1][1] == MIN_LOGPROB
    assert token_logprob(torch.full((3,), float("-inf"), dtype=torch.float64), 0, 1).logprob == MIN_LOGPROB


def test_token_pieces_give_each_tokens_own_text_and_bytes(tokenizer):
    from services.coordinator.sampling import TokenPieces

    pieces = TokenPieces(tokenizer)
    word = next(i for i in range(len(tokenizer)) if tokenizer.convert_ids_to_tokens(i).startswith("\u2581")
                and len(tokenizer.convert_ids_to_tokens(i)) > 2)
    text = tokenizer.convert_ids_to_tokens(word)[1:]
    assert pieces.piece(word) == (" " + text, list((" " + text).encode()))
    byte = tokenizer.convert_tokens_to_ids("<0xE2>")
    assert pieces.piece(byte) == ("\ufffd", [0xE2])


def test_token_pieces_of_a_byte_level_vocabulary_are_exact_bytes(smollm2_dir):
    from transformers import AutoTokenizer

    from services.coordinator.sampling import TokenPieces

    byte_level = AutoTokenizer.from_pretrained(smollm2_dir)
    pieces = TokenPieces(byte_level)
    ids = byte_level("Grüße, Paris ☃", add_special_tokens=False).input_ids
    assert b"".join(bytes(pieces.piece(i)[1]) for i in ids) == "Grüße, Paris ☃".encode()
    assert pieces.piece(byte_level.eos_token_id)[0] == byte_level.eos_token


# ------------------------------------------------------------------------------------------ model defaults
def test_sampling_defaults_come_from_the_catalog_then_the_generation_config():
    from transformers import GenerationConfig

    from services.coordinator.sampling import GENERIC_SAMPLING_DEFAULTS, sampling_defaults
    from services.models.catalog import SMOLLM2, TINY

    assert sampling_defaults(SMOLLM2.model_id) == {**GENERIC_SAMPLING_DEFAULTS, "temperature": 0.0,
                                                   "repetition_penalty": 1.1}
    assert sampling_defaults(SMOLLM2.model_id, GenerationConfig(do_sample=True, temperature=0.9)) == \
        sampling_defaults(SMOLLM2.model_id)  # the catalog's recommendation wins
    assert sampling_defaults(TINY.model_id) == GENERIC_SAMPLING_DEFAULTS  # no recommendation of its own
    configured = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95, repetition_penalty=1.05)
    assert sampling_defaults("meta-llama/Llama-2-7b-chat-hf", configured) == {
        "temperature": 0.6, "top_p": 0.95, "top_k": 40, "repetition_penalty": 1.05}
    assert sampling_defaults("someone/plain", GenerationConfig()) == GENERIC_SAMPLING_DEFAULTS

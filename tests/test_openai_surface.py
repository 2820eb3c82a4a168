"""The OpenAI surface over the real app (uvicorn in a thread, real PostgreSQL and Redis) and the scripted engine
(tests/scripted_engine.py), called with the unmodified official ``openai`` client and with raw HTTP: every field
is implemented or refused with 400 ``unsupported_parameter`` naming it; logprobs shaped as OpenAI shapes them and
equal to the log-softmax of the logits the engine computed; omitted sampling fields take the model's defaults."""

from __future__ import annotations

import asyncio
import math
import uuid
from decimal import Decimal

import httpx
import openai
import pytest
import torch

from services.common.config import Settings
from services.coordinator.openai_protocol import REFUSED_FIELDS
from services.coordinator.sampling import GENERIC_SAMPLING_DEFAULTS
from tests.fixtures.swarm import create_api_key
from tests.scripted_engine import Script, ScriptedModel, ScriptedReadiness, scripted_engine, scripted_logits, serve_app

MODEL_ID = "test/scripted-openai"
MESSAGES = [{"role": "user", "content": "Say hello"}]
TEXT = "hello world, hello mesh"

CHAT_REFUSED = ["audio", "modalities", "prediction", "service_tier", "store", "reasoning_effort", "verbosity",
                "web_search_options", "prompt_cache_key", "functions", "function_call", "frobnicate"]
COMPLETION_REFUSED = ["suffix", "echo", "best_of", "top_logprobs", "messages", "frobnicate"]


@pytest.fixture(scope="module")
def live(tiny_model_dir, postgres_url, redis_url):
    from transformers import AutoTokenizer

    from services.coordinator.app import create_app

    model = ScriptedModel(MODEL_ID, AutoTokenizer.from_pretrained(tiny_model_dir), script=Script(text=TEXT))
    settings = Settings(POSTGRES_URL=postgres_url, REDIS_URL=redis_url, DEFAULT_MODEL_ID=MODEL_ID, JWT_SECRET="",
                        PRICE_PER_TOKEN_FAR=Decimal("0.0001"), PRICE_PER_PROMPT_TOKEN_FAR=Decimal(0),
                        PLATFORM_FEE_BPS=1000, GENERATION_TIMEOUT_S=60)
    app = create_app(settings, coordinator_id=f"openai-{uuid.uuid4().hex[:6]}",
                     engine_factory=scripted_engine(model, ScriptedReadiness(MODEL_ID)))
    _, key = asyncio.run(create_api_key(postgres_url))
    with serve_app(app, "openai-surface") as url:
        yield url, key, model


@pytest.fixture
def client(live):
    url, key, _ = live
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def post(live, path, body):
    url, key, _ = live
    return httpx.post(f"{url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


# ------------------------------------------------------------------------------------ nothing silently ignored
@pytest.mark.parametrize("field", CHAT_REFUSED)
def test_a_chat_field_not_implemented_is_a_400_naming_it(live, field):
    started = len(live[2].started)
    answer = post(live, "/v1/chat/completions", {"messages": MESSAGES, field: None if field == "store" else 1})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "unsupported_parameter" and error["type"] == "invalid_request_error"
    assert error["param"] == field and repr(field) in error["message"]
    if field in REFUSED_FIELDS:
        assert REFUSED_FIELDS[field] in error["message"]
    assert len(live[2].started) == started  # refused before anything ran or was reserved


@pytest.mark.parametrize("field", COMPLETION_REFUSED)
def test_a_completions_field_not_implemented_is_a_400_naming_it(live, field):
    answer = post(live, "/v1/completions", {"prompt": "Hi", field: 2})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "unsupported_parameter" and answer.json()["error"]["param"] == field


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "hi", "name": "ann"}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                 {"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[1]"),
    ({"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True, "include_obfuscation": True}},
     "stream_options.include_obfuscation"),
])
def test_nested_fields_not_implemented_are_named_too(live, body, param):
    answer = post(live, "/v1/chat/completions", body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"].startswith(param)


def test_the_official_client_raises_bad_request_and_user_and_metadata_are_accepted(client):
    with pytest.raises(openai.BadRequestError) as several:
        client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, n=3)
    assert several.value.body["param"] == "n" and "n > 1" in several.value.body["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, modalities=["text", "audio"],
                                       audio={"voice": "alloy", "format": "wav"})
    assert refused.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_ID, prompt="Hi", suffix="!")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, service_tier="flex")
    answer = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, user="u-1",
                                            metadata={"team": "eval"}, max_tokens=3)
    assert answer.choices[0].message.content


# ------------------------------------------------------------------------------------------------- logprobs
def _expected(step: int, token_id: int, vocabulary: int, top: int):
    """The log-softmax the scripted engine computed at its 1-based ``step``, and its ``top`` largest values."""
    logprobs = torch.log_softmax(scripted_logits(step, token_id, vocabulary), dim=-1)
    return float(logprobs[token_id]), torch.topk(logprobs, top).values.tolist()


def _scripted_ids(live):
    tokenizer = live[2].tokenizer
    return tokenizer(TEXT, add_special_tokens=False).input_ids, len(tokenizer)


def test_chat_logprobs_streamed_and_not_are_the_log_softmax_of_the_logits(live, client):
    ids, vocabulary = _scripted_ids(live)
    whole = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, logprobs=True, top_logprobs=3,
                                           max_tokens=40)
    content = whole.choices[0].logprobs.content
    assert len(content) == len(ids)  # every generated token but the final EOS (which is not text)
    # a token's own text: the SentencePiece decoder drops the leading space of the text's first token only
    assert "".join(entry.token for entry in content) == " " + whole.choices[0].message.content == " " + TEXT
    for step, (entry, token_id) in enumerate(zip(content, ids)):
        logprob, top = _expected(step + 1, token_id, vocabulary, 3)
        assert math.isclose(entry.logprob, logprob, abs_tol=1e-9)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top, abs=1e-9)
        assert entry.top_logprobs[0].token == entry.token  # the scripted token is the most likely
        assert bytes(entry.bytes).decode() == entry.token
    streamed = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, logprobs=True, top_logprobs=3,
                                              max_tokens=40, stream=True)
    chunks = [c for c in streamed if c.choices]
    entries = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in entries] == [e.model_dump() for e in content]
    without = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=4)
    assert without.choices[0].logprobs is None


def test_completions_logprobs_have_tokens_offsets_and_top_dicts(live, client):
    ids, vocabulary = _scripted_ids(live)
    whole = client.completions.create(model=MODEL_ID, prompt="Say", logprobs=2, max_tokens=40)
    logprobs = whole.choices[0].logprobs
    assert "".join(logprobs.tokens) == " " + whole.choices[0].text == " " + TEXT
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(len(ids))]
    for step, token_id in enumerate(ids):
        logprob, top = _expected(step + 1, token_id, vocabulary, 2)
        assert math.isclose(logprobs.token_logprobs[step], logprob, abs_tol=1e-9)
        assert sorted(logprobs.top_logprobs[step].values(), reverse=True) == pytest.approx(top, abs=1e-9)
    streamed = list(client.completions.create(model=MODEL_ID, prompt="Say", logprobs=2, max_tokens=40, stream=True))
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in streamed if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert tokens == logprobs.tokens and offsets == logprobs.text_offset


def test_logprob_bounds_and_the_native_api(live):
    assert post(live, "/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}).status_code == 422
    assert post(live, "/v1/chat/completions", {"messages": MESSAGES, "logprobs": True,
                                               "top_logprobs": 21}).status_code == 422
    assert post(live, "/v1/completions", {"prompt": "Hi", "logprobs": 6}).status_code == 422
    native = post(live, "/mesh/inference/generate", {"prompt": "Hi", "logprobs": 1, "stream": False,
                                                     "max_tokens": 3}).json()
    assert len(native["logprobs"]) == 3 and all(len(entry["top_logprobs"]) == 1 for entry in native["logprobs"])
    assert "".join(entry["token"] for entry in native["logprobs"]).lstrip() == native["text"]


# ------------------------------------------------------------------------------------- sampling, defaults
def test_omitted_sampling_fields_take_the_model_defaults_and_given_ones_pass_through(live, client):
    model = live[2]
    client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=2)
    params = model.started[-1].params
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == tuple(
        GENERIC_SAMPLING_DEFAULTS[name] for name in ("temperature", "top_p", "top_k", "repetition_penalty"))
    client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=2, temperature=0.3,
                                   presence_penalty=0.5, frequency_penalty=-0.25, logit_bias={"7": -100, "9": 2.5},
                                   extra_body={"repetition_penalty": 1.2, "top_k": 5})
    params = model.started[-1].params
    assert (params.temperature, params.presence_penalty, params.frequency_penalty, params.repetition_penalty,
            params.top_k, dict(params.logit_bias)) == (0.3, 0.5, -0.25, 1.2, 5, {7: -100.0, 9: 2.5})
    outside = post(live, "/v1/chat/completions", {"messages": MESSAGES, "logit_bias": {"999999": 1}})
    assert outside.status_code == 400 and outside.json()["error"]["code"] == "invalid_logit_bias"
    for body in ({"presence_penalty": 2.5}, {"frequency_penalty": -3}, {"logit_bias": {"1": 101}},
                 {"logit_bias": {"x": 1}}, {"repetition_penalty": 0}):
        assert post(live, "/v1/chat/completions", {"messages": MESSAGES, **body}).status_code == 422, body

"""The Python SDK (sdk/python, package ``farlabs``): offline unit tests on a mock transport, then live tests against
a coordinator on a live tiny swarm, then a clean-venv install that must not bring torch."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

SDK_DIR = Path(__file__).resolve().parents[1] / "sdk" / "python"
sys.path.insert(0, str(SDK_DIR / "src"))

import farlabs  # noqa: E402
from farlabs import (APIConnectionError, AsyncFarMesh, AuthenticationError, ConflictError, FarMesh,  # noqa: E402
                     GenerationError, InsufficientBalanceError, InvalidRequestError, NotFoundError, RateLimitError,
                     SwarmNotReadyError)

PROMPT = "def compute(a, b):"


# ------------------------------------------------------------------------------------------ offline (mock)
def _sse(*events: tuple[str | None, dict]) -> bytes:
    out = []
    for name, data in events:
        out.append((f"event: {name}\r\n" if name else "") + f"data: {json.dumps(data)}\r\n\r\n")
    return ": ping\r\n\r\n".join(out).encode()


DONE = {"done": True, "request_id": "r1", "finish_reason": "length", "text": "Hello world",
        "usage": {"prompt_tokens": 3, "completion_tokens": 2}, "cost_far": "0.0002", "fee_far": "0.00002",
        "contributions": [{"node_id": "n1", "peer_id": "Qm1", "wallet_address": "0x" + "a" * 40, "blocks": "0:4",
                           "work_units": 8, "payment_far": "0.00018"}]}


def _mock(handler, **kwargs) -> tuple[FarMesh, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request, len(seen))

    client = FarMesh(api_key="fl_test", base_url="http://mesh.test", http_client=httpx.Client(
        transport=httpx.MockTransport(record)), **kwargs)
    return client, seen


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    recorded: list[float] = []
    monkeypatch.setattr(farlabs._client, "_sleep", recorded.append)
    return recorded


def test_stream_parsing_tokens_final_and_payload(sleeps):
    def handler(request, _n):
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=_sse(
            (None, {"token": "Hello", "request_id": "r1", "tokens_generated": 1, "cost_far": "0.0001"}),
            (None, {"token": "", "request_id": "r1", "tokens_generated": 2, "cost_far": "0.0002"}),
            (None, {"token": " world", "request_id": "r1", "tokens_generated": 2, "cost_far": "0.0002"}),
            (None, DONE)))

    client, seen = _mock(handler)
    stream = client.chat_stream([{"role": "user", "content": "hi"}], max_tokens=2, temperature=0, stop="\n",
                                model="m", request_id="r1")
    assert stream.request_id == "r1" and stream.response is None
    assert list(stream) == ["Hello", " world"]
    response = stream.response
    assert response is not None and response.text == "Hello world" == stream.text
    assert response.usage.total_tokens == 5 and response.cost_far == Decimal("0.0002")
    assert response.contributions[0].payment_far == Decimal("0.00018") and stream.finish_reason == "length"
    body = json.loads(seen[0].content)
    assert body == {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0,
                    "stop": ["\n"], "model_id": "m", "request_id": "r1", "stream": True}
    assert seen[0].headers["authorization"] == "Bearer fl_test" and seen[0].url.path == "/mesh/inference/generate"


def test_penalties_bias_and_logprobs_are_sent_and_parsed(sleeps):
    entry = {"token": " world", "logprob": -0.5, "bytes": list(b" world"),
             "top_logprobs": [{"token": " world", "logprob": -0.5, "bytes": list(b" world")}]}

    def handler(request, _n):
        if json.loads(request.content)["stream"]:
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=_sse(
                (None, {"token": " world", "request_id": "r1", "tokens_generated": 1, "cost_far": "0.0001",
                        "logprobs": entry}), (None, DONE)))
        return httpx.Response(200, json={**DONE, "logprobs": [entry]})

    client, seen = _mock(handler)
    answer = client.chat("hi", presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.1,
                         logit_bias={42: -100}, logprobs=1)
    body = json.loads(seen[0].content)
    assert (body["presence_penalty"], body["frequency_penalty"], body["repetition_penalty"], body["logit_bias"],
            body["logprobs"]) == (0.5, 0.25, 1.1, {"42": -100}, 1)
    assert "temperature" not in body  # omitted: the model's recommended value
    assert answer.logprobs[0].token == " world" and answer.logprobs[0].top_logprobs[0].logprob == -0.5
    stream = client.chat_stream("hi", logprobs=1)
    assert list(stream) == [" world"]
    assert stream.response.logprobs == [farlabs.TokenLogprob.from_json(entry)]
    assert client.chat("hi").logprobs == [farlabs.TokenLogprob.from_json(entry)]  # as the server sent it


def test_n_choices_are_parsed_and_streams_refuse_them():
    choices = [{"index": i, "text": f"t{i}", "finish_reason": "eos", "completion_tokens": 2} for i in range(2)]
    client, seen = _mock(lambda request, n: httpx.Response(200, json={**DONE, "choices": choices}))
    answer = client.chat("hi", n=2)
    assert json.loads(seen[0].content)["n"] == 2
    assert [(c.index, c.text, c.finish_reason, c.completion_tokens) for c in answer.choices] == [
        (0, "t0", "eos", 2), (1, "t1", "eos", 2)]
    with pytest.raises(ValueError, match="n > 1"):
        client.chat_stream("hi", n=2)


def test_replayed_request_streams_its_stored_text():
    client, _ = _mock(lambda request, n: httpx.Response(200, headers={"content-type": "text/event-stream"},
                                                        content=_sse((None, DONE))))
    stream = client.chat_stream("hi")
    assert list(stream) == ["Hello world"] and stream.response.text == "Hello world"


@pytest.mark.parametrize("status,body,headers,cls", [
    (401, {"error": {"code": "invalid_credentials", "message": "unknown API key"}}, {}, AuthenticationError),
    (402, {"error": {"code": "insufficient_balance", "message": "low", "required_far": "0.01",
                     "available_far": "0"}}, {}, InsufficientBalanceError),
    (422, {"error": {"code": "invalid_request", "message": "max_tokens: too big"}}, {}, InvalidRequestError),
    (400, {"error": {"code": "prompt_too_long", "message": "long"}}, {}, InvalidRequestError),
    (404, {"error": {"code": "model_not_found", "message": "nope"}}, {}, NotFoundError),
    (409, {"error": {"code": "duplicate_request", "message": "dup"}}, {}, ConflictError),
    (502, {"error": {"code": "swarm_error", "message": "boom"}}, {}, GenerationError),
    (429, {"error": {"code": "rate_limited", "message": "slow", "retry_after_s": 7}}, {"Retry-After": "7"},
     RateLimitError),
    (503, {"error": {"code": "swarm_not_ready", "message": "blocks", "missing_blocks": [2, 3],
                     "loading_blocks": [], "retry_after_s": 5}}, {"Retry-After": "5"}, SwarmNotReadyError),
])
def test_error_classes(status, body, headers, cls, sleeps):
    client, seen = _mock(lambda request, n: httpx.Response(status, json=body, headers=headers), max_retries=0)
    with pytest.raises(cls) as raised:
        client.chat("hi")
    assert raised.value.status_code == status and raised.value.code == body["error"]["code"]
    assert len(seen) == 1 and sleeps == []
    if cls is InsufficientBalanceError:
        assert raised.value.required_far == "0.01" and raised.value.available_far == "0"
    if cls is RateLimitError:
        assert raised.value.retry_after == 7
    if cls is SwarmNotReadyError:
        assert raised.value.missing_blocks == [2, 3] and raised.value.retry_after == 5


def test_retries_honour_retry_after_then_succeed(sleeps):
    def handler(request, n):
        if n == 1:
            return httpx.Response(429, json={"error": {"code": "rate_limited", "message": "x", "retry_after_s": 3}},
                                  headers={"Retry-After": "3"})
        if n == 2:
            return httpx.Response(503, json={"error": {"code": "swarm_not_ready", "message": "x",
                                                       "missing_blocks": [1]}}, headers={"Retry-After": "2"})
        return httpx.Response(200, json=DONE)

    client, seen = _mock(handler, max_retries=2)
    assert client.chat("hi").text == "Hello world"
    assert sleeps == [3.0, 2.0] and len(seen) == 3
    assert len({json.loads(r.content)["request_id"] for r in seen}) == 1  # one idempotency key for every try


def test_retries_are_bounded_and_back_off_without_retry_after(sleeps):
    client, seen = _mock(lambda r, n: httpx.Response(503, json={"error": {"code": "swarm_not_ready",
                                                                          "message": "x"}}), max_retries=3)
    with pytest.raises(SwarmNotReadyError):
        client.chat("hi")
    assert len(seen) == 4 and len(sleeps) == 3 and sleeps[0] < sleeps[1] < sleeps[2] <= 10


def test_never_retries_a_stream_that_began(sleeps):
    client, seen = _mock(lambda r, n: httpx.Response(200, headers={"content-type": "text/event-stream"}, content=_sse(
        (None, {"token": "Hi", "request_id": "r1", "tokens_generated": 1, "cost_far": "0.0001"}),
        ("error", {"error": {"code": "swarm_error", "message": "server died", "tokens_generated": 1}}))),
        max_retries=5)
    stream = client.chat_stream("hi")
    tokens = []
    with pytest.raises(GenerationError) as raised:
        for token in stream:
            tokens.append(token)
    assert tokens == ["Hi"] and raised.value.code == "swarm_error" and raised.value.status_code is None
    assert len(seen) == 1 and sleeps == []


def test_stream_cut_before_final_event_is_a_connection_error():
    client, _ = _mock(lambda r, n: httpx.Response(200, headers={"content-type": "text/event-stream"}, content=_sse(
        (None, {"token": "Hi", "request_id": "r1", "tokens_generated": 1, "cost_far": "0.0001"}))))
    with pytest.raises(APIConnectionError):
        list(client.chat_stream("hi"))


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("FARLABS_API_KEY", "fl_env")
    monkeypatch.setenv("FARLABS_BASE_URL", "http://env.test:9/")
    client = FarMesh()
    assert client.api_key == "fl_env" and client.base_url == "http://env.test:9"
    assert FarMesh(api_key="fl_arg", base_url="http://arg.test").base_url == "http://arg.test"
    with pytest.raises(TypeError):
        client.chat("hi", temprature=0)


def test_connection_refused_is_retried_then_raised(sleeps):
    client = FarMesh(api_key="k", base_url="http://127.0.0.1:9", max_retries=1)
    with pytest.raises(APIConnectionError):
        client.chat("hi")
    assert len(sleeps) == 1


# -------------------------------------------------------------------------------------------------- live
@pytest.fixture(scope="module")
def client(coordinator):
    with FarMesh(api_key=coordinator.api_key, base_url=coordinator.url, timeout=120, max_retries=0) as mesh:
        yield mesh


@pytest.mark.swarm
def test_live_stream_equals_non_stream_for_greedy(client):
    full = client.chat(PROMPT, max_tokens=24, temperature=0)
    with client.chat_stream(PROMPT, max_tokens=24, temperature=0) as stream:
        tokens = list(stream)
    assert len(tokens) >= 2 and "".join(tokens) == stream.text == stream.response.text == full.text
    assert full.finish_reason == stream.finish_reason == "length"
    assert full.usage.completion_tokens == stream.usage.completion_tokens == 24
    assert full.usage == stream.usage and full.cost_far == stream.cost_far > 0
    assert full.request_id != stream.request_id
    for response in (full, stream.response):
        assert {c.blocks for c in response.contributions} == {"0:2", "2:4"}
        assert sum(c.payment_far for c in response.contributions) + response.fee_far == response.cost_far
    status = client.status(stream.request_id)
    assert status.status == "completed" and status.tokens_generated == 24

    # chat messages, and a finished request asked again (same request_id) replays its text without re-running
    chat = client.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                       max_tokens=8, temperature=0)
    assert chat.usage.completion_tokens <= 8 and chat.finish_reason in ("length", "stop", "eos")
    replay = client.chat_stream(PROMPT, max_tokens=24, temperature=0, request_id=stream.request_id)
    assert "".join(replay) == full.text and replay.response.request_id == stream.request_id


@pytest.mark.swarm
async def test_live_async_client(coordinator):
    async with AsyncFarMesh(api_key=coordinator.api_key, base_url=coordinator.url, max_retries=0) as mesh:
        full = await mesh.chat(PROMPT, max_tokens=16, temperature=0)
        async with mesh.chat_stream(PROMPT, max_tokens=16, temperature=0) as stream:
            tokens = [token async for token in stream]
        assert "".join(tokens) == stream.response.text == full.text and stream.usage.completion_tokens == 16
        models = await mesh.models()
        assert [m.id for m in models] == ["far-mesh/tiny-llama"] and models[0].ready

        # cancel from the async client
        stream = mesh.chat_stream(PROMPT, max_tokens=200, temperature=0)
        count = 0
        async for _ in stream:
            count += 1
            if count == 2:
                assert await stream.cancel() == "cancelling"
        assert stream.finish_reason == "cancelled" and stream.usage.completion_tokens < 200

        with pytest.raises(AuthenticationError):
            await AsyncFarMesh(api_key="fl_wrong", base_url=coordinator.url).chat("hi", max_tokens=1)


@pytest.mark.swarm
async def test_live_chat_stream_async_of_the_sync_client(client):
    """FarMesh.chat_stream_async (the action plan's ``mesh.chat_stream_async``): the async stream of a sync client,
    with a client of its own that is closed when the stream ends, fails or is left."""
    full = client.chat(PROMPT, max_tokens=16, temperature=0)
    stream = client.chat_stream_async(PROMPT, max_tokens=16, temperature=0)
    tokens = [token async for token in stream]
    assert "".join(tokens) == stream.text == full.text and stream.usage.completion_tokens == 16
    assert stream.cost_far == full.cost_far and stream.finish_reason == "length"
    assert stream._client._client.is_closed  # ended: its own AsyncClient is closed

    async with client.chat_stream_async([{"role": "user", "content": "Hi"}], max_tokens=200,
                                        temperature=0) as stream:
        async for _ in stream:
            break  # leaving early closes the connection (the coordinator cancels)
    assert stream._client._client.is_closed

    wrong = FarMesh(api_key="fl_wrong", base_url=client.base_url, max_retries=0)
    failing = wrong.chat_stream_async("hi", max_tokens=1)
    with pytest.raises(AuthenticationError):
        async for _ in failing:
            pass
    assert failing._client._client.is_closed
    wrong.close()


@pytest.mark.swarm
def test_live_models(client):
    models = client.models()
    assert models[0].id == "far-mesh/tiny-llama" and models[0].ready and models[0].missing_blocks == []
    assert models[0].context_length and models[0].context_length > 100


@pytest.mark.swarm
def test_live_cancel_stops_the_stream(client):
    stream = client.chat_stream(PROMPT, max_tokens=200, temperature=0)
    tokens = []
    started = time.monotonic()
    for token in stream:
        tokens.append(token)
        if len(tokens) == 3:
            assert client.cancel(stream.request_id) == "cancelling"
    assert stream.finish_reason == "cancelled"
    assert stream.usage.completion_tokens < 200 and stream.response.cost_far > 0
    assert time.monotonic() - started < 30
    assert client.status(stream.request_id).status == "cancelled"

    # closing the stream drops the connection: the coordinator cancels too
    stream = client.chat_stream(PROMPT, max_tokens=200, temperature=0)
    next(stream)
    stream.close()
    deadline = time.monotonic() + 20
    while client.status(stream.request_id).status == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    final = client.status(stream.request_id)
    assert final.status == "cancelled" and final.tokens_generated < 200


@pytest.mark.swarm
def test_live_error_classes(coordinator, postgres_url):
    from tests.fixtures.swarm import create_api_key

    with pytest.raises(AuthenticationError) as raised:
        FarMesh(api_key="fl_wrong", base_url=coordinator.url).chat("hi", max_tokens=1)
    assert raised.value.status_code == 401 and raised.value.headers.get("www-authenticate") == "Bearer"

    _, broke = asyncio.run(create_api_key(postgres_url, balance="0"))
    with pytest.raises(InsufficientBalanceError) as raised:
        FarMesh(api_key=broke, base_url=coordinator.url).chat_stream("hi", max_tokens=4)
    assert Decimal(raised.value.required_far) > 0 and Decimal(raised.value.available_far) == 0

    _, limited = asyncio.run(create_api_key(postgres_url, rate_limit=1))
    slow = FarMesh(api_key=limited, base_url=coordinator.url, max_retries=0)
    with pytest.raises(RateLimitError) as raised:
        for _ in range(3):  # a fixed one-minute window: the 2nd request is limited unless the window just rolled
            slow.chat("hi", max_tokens=1)
    assert raised.value.status_code == 429 and 1 <= raised.value.retry_after <= 61

    mesh = FarMesh(api_key=coordinator.api_key, base_url=coordinator.url, max_retries=0)
    with pytest.raises(InvalidRequestError):
        mesh.chat("hi", max_tokens=10_000)
    with pytest.raises(NotFoundError):
        mesh.chat("hi", model="nope/nope")
    with pytest.raises(NotFoundError):
        mesh.cancel("req_does_not_exist")


@pytest.mark.swarm
def test_live_swarm_not_ready(not_ready_coordinator):
    key, url = not_ready_coordinator.api_key, not_ready_coordinator.url
    with pytest.raises(SwarmNotReadyError) as raised:
        FarMesh(api_key=key, base_url=url, max_retries=0).chat_stream("hi", max_tokens=4)
    assert raised.value.status_code == 503 and raised.value.missing_blocks == [2, 3]
    assert raised.value.retry_after and raised.value.retry_after > 0

    started = time.monotonic()  # one retry, after the server's Retry-After
    with pytest.raises(SwarmNotReadyError):
        FarMesh(api_key=key, base_url=url, max_retries=1).chat("hi", max_tokens=4)
    assert time.monotonic() - started >= raised.value.retry_after - 0.5

    models = FarMesh(api_key=key, base_url=url).models()
    assert not models[0].ready and models[0].missing_blocks == [2, 3]


# ------------------------------------------------------------------------------------------ clean install
@pytest.mark.swarm
def test_installs_into_a_clean_venv_without_torch(tmp_path, coordinator):
    """``pip install sdk/python`` into a fresh venv (httpx + httpx-sse from PyPI), import without torch, and talk
    to the live coordinator from there."""
    source = tmp_path / "farlabs-src"
    shutil.copytree(SDK_DIR, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(source)],
                             capture_output=True, text=True, env=env, timeout=300)
    assert install.returncode == 0, install.stderr
    check = subprocess.run([str(python), "-c", """
import importlib.util, sys
import farlabs
from farlabs import FarMesh
assert "torch" not in sys.modules and "petals" not in sys.modules
assert importlib.util.find_spec("torch") is None and importlib.util.find_spec("petals") is None
assert farlabs.__file__.startswith(sys.prefix), farlabs.__file__
import pathlib; assert (pathlib.Path(farlabs.__file__).parent / "py.typed").exists()
reply = FarMesh(max_retries=0).chat("def compute(a, b):", max_tokens=4, temperature=0)
print(reply.usage.completion_tokens)
"""], capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env=dict(env, FARLABS_API_KEY=coordinator.api_key, FARLABS_BASE_URL=coordinator.url))
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "4"


def test_balance_usage_and_what_a_402_says():
    """mesh.balance() / mesh.usage() (docs/accounts.md) and the top-up hint of a 402."""
    from decimal import Decimal

    deposit = {"network": "testnet", "chain_id": 97, "contract": "0x" + "c" * 40, "token": "0x" + "d" * 40,
               "account_ref": "0x" + "0" * 32 + "e" * 32, "confirmations": 3, "how": "approve then deposit",
               "docs": "docs/accounts.md#depositing-far"}

    def handler(request: httpx.Request, _n: int) -> httpx.Response:
        if request.url.path == "/mesh/account":
            return httpx.Response(200, json={"account_id": "a1", "name": "dev", "balance_far": "1.5",
                                             "reserved_far": "0.01", "available_far": "1.49", "deposited_far": "1",
                                             "granted_far": "0.5", "charged_far": "0.0023", "deposit": deposit})
        if request.url.path == "/mesh/account/usage":
            assert request.url.params["limit"] == "10" and request.url.params["days"] == "7"
            return httpx.Response(200, json={
                "requests": [{"request_id": "r1", "model_id": "m", "status": "completed", "finish_reason": "length",
                              "prompt_tokens": 3, "completion_tokens": 23, "cost_far": "0.0023",
                              "reserved_far": "0.01", "created_at": "2026-01-01T00:00:00+00:00",
                              "finalized_at": "2026-01-01T00:00:01+00:00",
                              "nodes": [{"node_id": "n1", "peer_id": "Qm1", "wallet_address": None, "blocks": "0:4",
                                         "work_units": 8, "payment_far": "0.00207"}]}],
                "next_before": None, "daily": [{"day": "2026-01-01", "requests": 1, "prompt_tokens": 3,
                                                "completion_tokens": 23, "cost_far": "0.0023"}],
                "totals": {"requests": 1, "prompt_tokens": 3, "completion_tokens": 23, "cost_far": "0.0023"}})
        return httpx.Response(402, json={"error": {"code": "insufficient_balance", "message": "low",
                                                   "required_far": "0.01", "available_far": "0.001",
                                                   "shortfall_far": "0.009", "deposit": deposit}})

    client, seen = _mock(handler, max_retries=0)
    balance = client.balance()
    assert balance.available_far == Decimal("1.49") and balance.deposit["account_ref"] == deposit["account_ref"]
    usage = client.usage(limit=10, days=7)
    assert usage.total_cost_far == Decimal("0.0023") and usage.requests[0].cost_far == Decimal("0.0023")
    assert usage.requests[0].nodes[0]["blocks"] == "0:4" and usage.daily[0]["requests"] == 1
    with pytest.raises(InsufficientBalanceError) as error:
        client.chat("hi", max_tokens=100)
    assert error.value.shortfall_far == "0.009" and error.value.deposit["confirmations"] == 3
    assert all(r.headers["authorization"] == "Bearer fl_test" for r in seen)

"""The coordinator as users meet it: the official openai client, sampling controls, accounts, cancellation and
concurrency, against a live coordinator on a live 2-server swarm."""

from __future__ import annotations

import asyncio
import threading
import time
from decimal import Decimal

import httpx
import openai
import pytest

from tests.fixtures.swarm import MODEL_ID, create_api_key, local_greedy, sse_events

pytestmark = pytest.mark.swarm

PROMPT = "def compute(a, b):"


@pytest.fixture(scope="session")
def reference(swarm_client, local_model):
    """Greedy continuation of PROMPT by the local model: (token ids, decode function)."""
    prompt_ids = swarm_client.encode(PROMPT)
    tokens = local_greedy(local_model, prompt_ids, 64)

    def text(n: int) -> str:
        return swarm_client.tokenizer.decode(tokens[:n], skip_special_tokens=True)

    return tokens, text


def _post(coordinator, payload, headers=None, **kwargs):
    return httpx.post(f"{coordinator.url}/mesh/inference/generate", json=payload,
                      headers=coordinator.headers if headers is None else headers, timeout=120, **kwargs)


def test_openai_client_completions_stream_and_not(coordinator, reference):
    _, text = reference
    client = openai.OpenAI(base_url=f"{coordinator.url}/v1", api_key=coordinator.api_key, max_retries=0)
    whole = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=20, temperature=0)
    assert whole.choices[0].text == text(20)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 20

    chunks = list(client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text(20)
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


# Swarm and local model compute the same float32 logits in a different order: their log-softmax agree this closely.
LOGPROB_TOLERANCE = 1e-3


def test_logprobs_at_temperature_zero_are_the_local_models_log_softmax(coordinator, reference, local_model,
                                                                       swarm_client):
    import torch

    tokens, text = reference
    client = openai.OpenAI(base_url=f"{coordinator.url}/v1", api_key=coordinator.api_key, max_retries=0)
    answer = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=5)
    logprobs = answer.choices[0].logprobs
    assert answer.choices[0].text == text(12) and len(logprobs.token_logprobs) == 12
    prompt_ids = swarm_client.encode(PROMPT)
    with torch.inference_mode():
        logits = local_model(torch.tensor([prompt_ids + tokens[:12]])).logits[0, len(prompt_ids) - 1:-1]
    expected = torch.log_softmax(logits.double(), dim=-1)
    for step, token_id in enumerate(tokens[:12]):
        assert abs(logprobs.token_logprobs[step] - float(expected[step, token_id])) < LOGPROB_TOLERANCE
        top = sorted(logprobs.top_logprobs[step].values(), reverse=True)[:5]
        assert top == pytest.approx(torch.topk(expected[step], 5).values.tolist(), abs=LOGPROB_TOLERANCE)
    chat = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert all(entry.top_logprobs[0].logprob == pytest.approx(entry.logprob) for entry in content)  # greedy


def test_openai_client_chat_and_models(coordinator):
    client = openai.OpenAI(base_url=f"{coordinator.url}/v1", api_key=coordinator.api_key, max_retries=0)
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert models.data[0].model_extra["ready"] is True

    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."}]
    whole = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12, temperature=0)
    streamed = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12, temperature=0,
                                              stream=True)
    parts = [chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices]
    assert whole.choices[0].message.role == "assistant"
    assert "".join(parts) == whole.choices[0].message.content
    assert whole.usage.prompt_tokens > 10

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{coordinator.url}/v1", api_key="fl_wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope/nope", prompt="x", max_tokens=2)


def test_max_tokens_and_stop_sequences_cut_exactly(coordinator, reference):
    _, text = reference
    full = text(40)
    for n in (1, 7, 40):
        body = _post(coordinator, {"prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": False}).json()
        assert body["usage"]["completion_tokens"] == n and body["text"] == text(n) and body["finish_reason"] == "length"

    # a 4-character stop sequence whose first occurrence is at least 10 characters in
    stop = next(full[i:i + 4] for i in range(10, len(full) - 4) if full.find(full[i:i + 4]) == i)
    events = coordinator.generate_stream({"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stop": [stop]})
    final = events[-1]["data"]
    streamed = "".join(e["data"]["token"] for e in events[:-1])
    assert final["finish_reason"] == "stop"
    assert streamed == final["text"] == full[: full.find(stop)]  # the stop sequence itself is never emitted
    assert stop not in streamed


def test_same_seed_same_text(coordinator):
    def sample(seed):
        body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 1.0, "top_p": 0.95, "top_k": 50, "seed": seed,
                "stream": False}
        return _post(coordinator, body).json()["text"]

    first = sample(7)
    assert sample(7) == first
    assert any(sample(seed) != first for seed in (8, 9, 10))


def test_credentials_balance_and_rate_limit(coordinator, postgres_url):
    payload = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": False}
    missing = _post(coordinator, payload, headers={})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_credentials"
    wrong = _post(coordinator, payload, headers={"Authorization": "Bearer fl_not_a_key"})
    assert wrong.status_code == 401 and "invalid API key" in wrong.json()["error"]["message"]

    _, poor_key = asyncio.run(create_api_key(postgres_url, balance="0.0003"))
    poor = _post(coordinator, payload, headers={"Authorization": f"Bearer {poor_key}"})
    assert poor.status_code == 402
    assert poor.json()["error"]["required_far"] == "0.0004" and poor.json()["error"]["available_far"] == "0.0003"

    _, slow_key = asyncio.run(create_api_key(postgres_url, rate_limit=1))
    headers = {"Authorization": f"Bearer {slow_key}"}
    assert _post(coordinator, payload, headers=headers).status_code == 200
    limited = _post(coordinator, payload, headers=headers)
    assert limited.status_code == 429 and 1 <= int(limited.headers["Retry-After"]) <= 61
    assert limited.json()["error"]["code"] == "rate_limited"


async def test_prepaid_balance_reserved_then_settled_and_request_id_idempotent(coordinator, postgres_url, db_pool):
    account_id, key = await create_api_key(postgres_url, balance="1")
    headers = {"Authorization": f"Bearer {key}"}
    payload = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stream": False, "request_id": "idem_001"}
    async with httpx.AsyncClient(base_url=coordinator.url, headers=headers, timeout=120) as client:
        first = (await client.post("/mesh/inference/generate", json=payload)).json()
        again = (await client.post("/mesh/inference/generate", json=payload)).json()
    assert again == first  # the stored result: nothing generated or charged twice
    account = await db_pool.fetchrow("SELECT balance_far, reserved_far FROM far_accounts WHERE account_id = $1::uuid",
                                     account_id)
    assert account["reserved_far"] == 0
    assert account["balance_far"] == Decimal("1") - Decimal(first["cost_far"]) == Decimal("0.999")
    assert await db_pool.fetchval("SELECT count(*) FROM far_mesh_sessions WHERE request_id = 'idem_001'") == 1


def test_cancel_with_delete_and_by_dropping_the_connection(coordinator):
    request_id = f"cancel_{int(time.time() * 1000)}"
    payload = {"prompt": PROMPT, "max_tokens": 200, "temperature": 0, "request_id": request_id}
    seen, status = [], {}
    with httpx.stream("POST", f"{coordinator.url}/mesh/inference/generate", json=payload, headers=coordinator.headers,
                      timeout=120) as response:
        for event in sse_events(response):
            seen.append(event["data"])
            if len(seen) == 5:
                status = httpx.get(f"{coordinator.url}/mesh/inference/{request_id}", headers=coordinator.headers).json()
                cancelled = httpx.delete(f"{coordinator.url}/mesh/inference/{request_id}", headers=coordinator.headers)
                assert cancelled.json()["status"] == "cancelling"
    assert status["status"] == "running" and status["tokens_generated"] >= 5
    assert {hop["blocks"] for hop in status["route"]} == {"0:2", "2:4"}
    final = seen[-1]
    assert final["done"] and final["finish_reason"] == "cancelled"
    assert final["usage"]["completion_tokens"] < 200
    assert final["usage"]["completion_tokens"] <= len(seen)  # no token generated after the last one streamed

    dropped = f"drop_{int(time.time() * 1000)}"
    with httpx.stream("POST", f"{coordinator.url}/mesh/inference/generate", headers=coordinator.headers, timeout=120,
                      json={**payload, "request_id": dropped}) as response:
        for index, _ in enumerate(response.iter_lines()):
            if index > 6:
                break  # the client goes away mid-stream
    for _ in range(100):
        state = httpx.get(f"{coordinator.url}/mesh/inference/{dropped}", headers=coordinator.headers).json()
        if state["status"] != "running":
            break
        time.sleep(0.1)
    assert state["status"] == "cancelled" and state["tokens_generated"] < 200


def test_sixteen_concurrent_streams(coordinator, reference):
    _, text = reference
    results, errors = {}, []

    def stream(index: int) -> None:
        try:
            events = coordinator.generate_stream({"prompt": PROMPT, "max_tokens": 24, "temperature": 0}, timeout=300)
            results[index] = events
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    health = httpx.get(f"{coordinator.url}/healthz", timeout=30)  # the event loop keeps answering
    for thread in threads:
        thread.join()
    assert health.status_code == 200
    assert not errors and len(results) == 16
    for events in results.values():
        assert "".join(e["data"]["token"] for e in events[:-1]) == text(24) == events[-1]["data"]["text"]


async def test_request_id_of_a_failed_request_is_reported_not_replayed_as_success(coordinator, postgres_url, db_pool):
    from services.coordinator.store import Pricing, SessionStore

    account_id, key = await create_api_key(postgres_url, balance="1")
    store = SessionStore(db_pool)
    session_id = await store.create_session(request_id="failed_001", model_id=MODEL_ID, account_id=account_id,
                                            pricing=Pricing(Decimal("0.0001"), Decimal(0), 1000), prompt_tokens=5,
                                            reserved_far=Decimal("0.001"))
    await store.finalize(session_id, status="failed", finish_reason=None, prompt_tokens=5, completion_tokens=3,
                         error="swarm_error")
    async with httpx.AsyncClient(base_url=coordinator.url, headers={"Authorization": f"Bearer {key}"}) as client:
        again = await client.post("/mesh/inference/generate",
                                  json={"prompt": PROMPT, "max_tokens": 4, "request_id": "failed_001"})
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "request_failed" and again.json()["error"]["session_status"] == "failed"
    assert again.json()["error"]["cost_far"] == "0.0003"


def test_browsers_may_call_the_api_cross_origin(coordinator):
    preflight = httpx.options(f"{coordinator.url}/mesh/inference/generate", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    answer = httpx.get(f"{coordinator.url}/v1/models", headers={**coordinator.headers, "Origin": "https://app.example"})
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "*"
    assert "retry-after" in answer.headers["access-control-expose-headers"].lower()

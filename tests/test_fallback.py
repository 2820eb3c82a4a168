"""Fallback to centralized inference (issue 13 item 6, docs/fallback.md).

Live: a coordinator on the half swarm (blocks 2-3 missing: never ready) whose FALLBACK_ENDPOINTS names the live
coordinator's OpenAI-compatible API; every API (native SSE and JSON, OpenAI chat and completions, streamed and not)
is served there, says so, is charged at the fallback price and writes no contribution.
Failures: the coordinator's real HTTP app and InferenceService in process (a fake swarm model, real PostgreSQL) with
real upstreams that refuse (the live coordinator with a wrong key), never answer, are not there, or cut a stream.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from services.common.config import ConfigError, FallbackEndpoint, Settings
from services.coordinator.fallback import billed_tokens, parse_chunk, upstream_request
from services.coordinator.protocol import GenerateRequest
from tests.fixtures.swarm import MODEL_ID, asse_events, create_api_key, start_coordinator

PRICE = Decimal("0.0003")  # the fallback's, not the swarm's 0.0001
PROMPT_PRICE = Decimal("0.00001")
PROMPT = "def compute(a, b):"


# ----------------------------------------------------------------------------------------------- pure parts
def test_upstream_request_maps_prompt_and_messages():
    path, body = upstream_request(GenerateRequest(prompt="hi", max_tokens=5, temperature=0, stop=["\n"], seed=3),
                                  "up/model")
    assert path == "completions" and body["prompt"] == "hi" and body["model"] == "up/model"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 5 and body["stop"] == ["\n"] and body["seed"] == 3
    assert "top_k" not in body  # not an OpenAI parameter: only when the client set it
    path, body = upstream_request(GenerateRequest(messages=[{"role": "developer", "content": "be brief"},
                                                            {"role": "user", "content": "hi"}], top_k=7), "m")
    assert path == "chat/completions" and body["top_k"] == 7
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_upstream_request_forwards_response_format():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    _, body = upstream_request(GenerateRequest(prompt="x", response_format={
        "type": "json_schema", "json_schema": {"name": "n", "schema": schema}}), "m")
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}


def test_parse_chunk_and_billing_rule():
    assert parse_chunk({"choices": [{"delta": {"content": "a"}, "finish_reason": None}]}).text == "a"
    assert parse_chunk({"choices": [{"text": "b", "finish_reason": "length"}]}).finish_reason == "length"
    assert parse_chunk({"choices": [], "usage": {"completion_tokens": 4}}).completion_tokens == 4
    with pytest.raises(Exception, match="mid-stream") as failed:
        parse_chunk({"error": {"code": "x", "message": "boom"}})
    assert "boom" not in str(failed.value) and failed.value.detail == "boom"  # the upstream's words: log only
    # completed: the upstream's count, but never more than was delivered nor max_tokens; else only what was
    # delivered, nothing if nothing was
    def billed(completed, reported, delivered):
        return billed_tokens(completed=completed, reported_completion=reported, delivered=delivered, prompt_tokens=3,
                             max_tokens=8)

    assert billed(True, 3, 5) == (3, 3) and billed(True, None, 5) == (3, 5)
    assert billed(True, 7, 5) == (3, 5) and billed(True, 99, 5) == (3, 5) and billed(True, 99, 20) == (3, 8)
    assert billed(False, None, 2) == (3, 2) and billed(False, None, 0) == (0, 0)


def test_settings_are_off_by_default_and_bad_values_fail_in_one_line(monkeypatch, capsys):
    from services.common.config import load_settings
    from services.coordinator.app import fallback_clients

    assert Settings().FALLBACK_ENDPOINTS == {}
    good = {"m": {"url": "http://127.0.0.1:9/v1", "api_key": "sk-secret", "price_per_token_far": 0.0003}}
    endpoint = Settings(FALLBACK_ENDPOINTS=json.dumps(good)).FALLBACK_ENDPOINTS["m"]
    assert endpoint.price_per_token_far == Decimal("0.0003")  # parsed as a decimal, never through a float
    for bad, named in (("{not json", "FALLBACK_ENDPOINTS: Value error, not JSON"),
                       ('{"m": {"url": "http://x/v1"}}', "FALLBACK_ENDPOINTS.m.price_per_token_far: Field required"),
                       ('{"m": {"url": "ftp://x", "api_key": "sk-secret", "price_per_token_far": "1"}}', ".m.url"),
                       ('{"m": {"url": "http://x", "price_per_token_far": "1e-19"}}', "more than 18 decimals")):
        monkeypatch.setenv("FALLBACK_ENDPOINTS", bad)
        with pytest.raises(ConfigError):
            load_settings()
        err = capsys.readouterr().err
        assert named in err and "sk-secret" not in err, err
    with pytest.raises(ConfigError):  # a model this coordinator does not serve: a typo would leave it off
        fallback_clients(Settings(FALLBACK_ENDPOINTS=json.dumps(good)), ["other/model"])
    assert "FALLBACK_ENDPOINTS names ['m']" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- live
@pytest.fixture(scope="module")
def fallback_coordinator(half_swarm, coordinator, tiny_model_dir, postgres_url, redis_url, tmp_path_factory):
    """A coordinator of MODEL_ID on the half swarm, falling back to the live coordinator's /v1 (its key)."""
    account_id, key = asyncio.run(create_api_key(postgres_url, balance="10"))
    endpoints = {MODEL_ID: {"url": f"{coordinator.url}/v1", "api_key": coordinator.api_key,
                            "price_per_token_far": str(PRICE), "price_per_prompt_token_far": str(PROMPT_PRICE)}}
    started = start_coordinator(workdir=tmp_path_factory.mktemp("fallback"), model_dir=tiny_model_dir,
                                initial_peers=half_swarm.initial_peers, postgres_url=postgres_url,
                                redis_url=redis_url, api_key=key,
                                env_extra={"FALLBACK_ENDPOINTS": json.dumps(endpoints)})
    started.account_id = account_id
    yield started
    started.process.stop()


def _metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.mark.swarm
async def test_not_ready_swarm_is_served_by_the_fallback_at_its_price(fallback_coordinator, coordinator, db_pool):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sdk" / "python" / "src"))  # as test_sdk_python
    from farlabs import FarMesh

    fb, up = fallback_coordinator, coordinator
    # off by default: the live coordinator has no fallback; this one has, and its swarm misses blocks 2 and 3
    assert httpx.get(f"{up.url}/v1/models", headers=up.headers).json()["data"][0]["fallback"] is False
    model = httpx.get(f"{fb.url}/v1/models", headers=fb.headers).json()["data"][0]
    assert model["fallback"] is True and not model["ready"] and model["missing_blocks"] == [2, 3]
    balance_before = await db_pool.fetchval("SELECT balance_far FROM far_accounts WHERE account_id = $1",
                                            uuid.UUID(fb.account_id))

    # What the upstream itself answers (greedy), straight from it: the swarm's answer, metered to its providers.
    direct = httpx.post(f"{up.url}/v1/completions", headers=up.headers, timeout=120,
                        json={"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}).json()
    assert direct["served_by"] == "swarm"

    # 1. native SSE: token events, then the final event says fallback; charged at the fallback price
    events = fb.generate_stream({"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "request_id": "fb-sse-1"})
    tokens, final = [e["data"] for e in events[:-1]], events[-1]["data"]
    assert all(e["event"] == "message" for e in events) and final["done"] is True
    assert final["served_by"] == "fallback" and final["contributions"] == []
    assert final["text"] == "".join(t["token"] for t in tokens) == direct["choices"][0]["text"]
    usage = final["usage"]
    assert usage == {"prompt_tokens": direct["usage"]["prompt_tokens"],
                     "completion_tokens": direct["usage"]["completion_tokens"],
                     "prompt_tokens_details": {"cached_tokens": 0}}
    cost = usage["completion_tokens"] * PRICE + usage["prompt_tokens"] * PROMPT_PRICE
    assert Decimal(final["cost_far"]) == cost and Decimal(final["fee_far"]) == cost
    assert Decimal(tokens[-1]["cost_far"]) == len(tokens) * PRICE + usage["prompt_tokens"] * PROMPT_PRICE
    status = httpx.get(f"{fb.url}/mesh/inference/fb-sse-1", headers=fb.headers).json()
    assert status["status"] == "completed" and status["served_by"] == "fallback"

    # 2. native JSON with messages, through the Python SDK
    answer = FarMesh(api_key=fb.api_key, base_url=fb.url).chat([{"role": "user", "content": "hi"}], max_tokens=5,
                                                                temperature=0)
    assert answer.served_by == "fallback" and answer.contributions == [] and answer.usage.completion_tokens > 0

    # 3. OpenAI chat, streamed with usage: the last choice chunk and the usage chunk say fallback
    with httpx.stream("POST", f"{fb.url}/v1/chat/completions", headers=fb.headers, timeout=120,
                      json={"model": MODEL_ID, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6,
                            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert chunks[-2]["choices"][0]["finish_reason"] and chunks[-2]["served_by"] == "fallback"
    assert chunks[-1]["served_by"] == "fallback" and chunks[-1]["usage"]["completion_tokens"] > 0

    # 4. OpenAI completions, JSON
    body = httpx.post(f"{fb.url}/v1/completions", headers=fb.headers, timeout=120,
                      json={"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}).json()
    assert body["served_by"] == "fallback" and body["choices"][0]["text"] == direct["choices"][0]["text"]
    assert Decimal(body["cost_far"]) == cost

    # The books: four fallback sessions at the fallback price, all fee, no contribution; the account paid exactly that
    rows = await db_pool.fetch("SELECT * FROM far_mesh_sessions WHERE account_id = $1", uuid.UUID(fb.account_id))
    assert len(rows) == 4 and {r["served_by"] for r in rows} == {"fallback"}
    assert all(r["status"] == "completed" and r["price_per_token_far"] == PRICE and r["platform_fee_bps"] == 10_000
               and r["fee_far"] == r["cost_far"] > 0 for r in rows)
    assert await db_pool.fetchval("SELECT count(*) FROM far_session_contributions WHERE session_id = ANY($1::uuid[])",
                                  [r["session_id"] for r in rows]) == 0
    account = await db_pool.fetchrow("SELECT balance_far, reserved_far FROM far_accounts WHERE account_id = $1",
                                     uuid.UUID(fb.account_id))
    assert account["reserved_far"] == 0
    assert account["balance_far"] == balance_before - sum(r["cost_far"] for r in rows)
    # ... while the upstream served them from its swarm, metered to its providers
    upstream = await db_pool.fetch(
        """SELECT s.served_by, count(c.peer_id) AS contributions FROM far_mesh_sessions s
             LEFT JOIN far_session_contributions c USING (session_id)
            WHERE s.coordinator_id LIKE $1 GROUP BY s.session_id""", f"%:{up.url.rsplit(':', 1)[1]}")
    assert upstream and all(r["served_by"] == "swarm" and r["contributions"] > 0 for r in upstream)

    # far-mesh audit's conservation check holds and reports them
    from services.payouts.audit import check_conservation

    async with db_pool.acquire() as conn:
        check = await check_conservation(conn)
    assert check.ok, check.problems
    assert any("served by the fallback API" in note for note in check.notes)
    # the database refuses a contribution to a fallback session
    import asyncpg

    with pytest.raises(asyncpg.CheckViolationError, match="served by the fallback API"):
        await db_pool.execute("INSERT INTO far_session_contributions (session_id, peer_id, blocks) "
                              "VALUES ($1, 'QmX', '0:2')", rows[0]["session_id"])

    text = httpx.get(f"{fb.url}/metrics").text
    assert _metric(text, "farmesh_fallback_requests_total", model_id=MODEL_ID, outcome="completed") == 4
    assert _metric(httpx.get(f"{up.url}/metrics").text, "farmesh_fallback_requests_total", model_id=MODEL_ID,
                   outcome="completed") == 0


# ------------------------------------------------------------------------------------------------ failures
class NotReady:
    """The readiness of a swarm where no block is served (the real coverage computation over an empty DHT)."""

    async def current(self):
        from services.common.coverage import compute_coverage

        now = time.time()
        return compute_coverage("test/fake", 4, [[] for _ in range(4)], now=now, observed_at=now)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def harness(db_pool, tiny_model_dir):
    """The coordinator's HTTP app and InferenceService in process over the scripted engine (the tiny tokenizer), its
    swarm has no block; each test points its fallback (``_use``) at a real upstream."""
    from transformers import AutoTokenizer

    from services.coordinator.accounts import AccountStore
    from services.coordinator.app import http_app
    from services.coordinator.serving import InferenceService
    from services.coordinator.store import Pricing, SessionStore
    from tests.test_coordinator_hardening import scripted_model

    model = scripted_model(AutoTokenizer.from_pretrained(tiny_model_dir))
    service = InferenceService(store=SessionStore(db_pool), accounts=AccountStore(db_pool), limiter=None,
                               models={model.model_id: model}, readiness={model.model_id: NotReady()},
                               default_model_id=model.model_id, pricing=Pricing(Decimal("0.0001"), Decimal(0), 1000),
                               coordinator_id=f"test-{uuid.uuid4().hex[:6]}", jwt_secret="", max_workers=4)
    app = http_app(Settings(JWT_SECRET=""))
    app.state.service = service
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://coordinator") as client:
        yield service, client
    await service.aclose()


def _use(service, url: str, *, api_key: str = "", timeout_s: float = 30, model: str = MODEL_ID):
    from services.coordinator.fallback import FallbackClient

    endpoint = FallbackEndpoint(url=url, api_key=api_key, model=model, price_per_token_far=PRICE,
                                price_per_prompt_token_far=PROMPT_PRICE, timeout_s=timeout_s)
    service.fallbacks["test/fake"] = FallbackClient(endpoint, "test/fake")


async def _account(service, balance: str = "1"):
    account_id = await service.accounts.create_account(f"fb-{uuid.uuid4().hex[:8]}", Decimal(balance))
    _, key = await service.accounts.create_key(account_id)
    return account_id, {"Authorization": f"Bearer {key}"}


async def _serve(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"


@pytest.mark.swarm
async def test_upstream_failures_are_502_or_504_and_bill_only_what_was_delivered(harness, coordinator, db_pool):
    from services.coordinator import metrics

    service, client = harness
    account_id, headers = await _account(service)
    counted = lambda outcome: metrics.FALLBACK_REQUESTS.labels("test/fake", outcome)._value.get()  # noqa: E731
    errors_before, timeouts_before = counted("fallback_error"), counted("fallback_timeout")

    # refused: the live coordinator with a wrong key (its 401 reason is quoted), streamed and not
    _use(service, f"{coordinator.url}/v1", api_key="fl_wrong")
    for stream in (False, True):
        response = await client.post("/mesh/inference/generate", headers=headers,
                                     json={"prompt": PROMPT, "max_tokens": 4, "stream": stream})
        assert response.status_code == 502, response.text
        error = response.json()["error"]
        assert error["code"] == "fallback_error" and "HTTP 401" in error["message"], error
        assert error["served_by"] == "fallback" and error["cost_far"] == "0"

    # not there: a port nobody listens on
    server, url = await _serve(lambda reader, writer: writer.close())
    server.close()
    await server.wait_closed()
    _use(service, url)
    response = await client.post("/v1/chat/completions", headers=headers,
                                 json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert response.status_code == 502 and "could not be reached" in response.json()["error"]["message"]

    # never answers: 504 after timeout_s
    hold = asyncio.Event()

    async def silent(reader, writer):
        await hold.wait()
        writer.close()

    server, url = await _serve(silent)
    _use(service, url, timeout_s=0.5)
    started = time.monotonic()
    response = await client.post("/v1/completions", headers=headers, json={"prompt": PROMPT, "max_tokens": 4})
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "fallback_timeout" and time.monotonic() - started < 10
    hold.set()
    server.close()

    # cut mid-stream after three tokens: the client has them, then an error event; those three are billed
    async def cut(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        for piece in ("one", " two", " three"):
            writer.write(f'data: {{"choices": [{{"index": 0, "text": "{piece}", "finish_reason": null}}]}}\n\n'
                         .encode())
        await writer.drain()
        writer.close()

    server, url = await _serve(cut)
    _use(service, url)
    async with client.stream("POST", "/mesh/inference/generate", headers=headers,
                             json={"prompt": PROMPT, "max_tokens": 8, "request_id": "fb-cut"}) as response:
        events = [event async for event in asse_events(response)]
    server.close()
    assert [e["data"].get("token") for e in events[:3]] == ["one", " two", " three"]
    error = events[-1]
    assert error["event"] == "error" and error["data"]["error"]["code"] == "fallback_error"
    assert error["data"]["error"]["tokens_generated"] == 3
    prompt_tokens = len(service.models["test/fake"].encode(PROMPT))
    billed = 3 * PRICE + prompt_tokens * PROMPT_PRICE
    assert Decimal(error["data"]["error"]["cost_far"]) == billed

    rows = await db_pool.fetch("SELECT * FROM far_mesh_sessions WHERE account_id = $1 ORDER BY created_at",
                               uuid.UUID(account_id))
    assert [r["status"] for r in rows] == ["failed"] * 5 and {r["served_by"] for r in rows} == {"fallback"}
    assert [r["cost_far"] for r in rows] == [0, 0, 0, 0, billed]  # nothing delivered, nothing charged
    assert rows[-1]["output_text"] == "one two three" and rows[-1]["completion_tokens"] == 3
    account = await db_pool.fetchrow("SELECT balance_far, reserved_far FROM far_accounts WHERE account_id = $1",
                                     uuid.UUID(account_id))
    assert account["balance_far"] == Decimal(1) - billed and account["reserved_far"] == 0
    assert counted("fallback_error") - errors_before == 4 and counted("fallback_timeout") - timeouts_before == 1


async def test_cancel_stops_the_upstream_and_bills_what_was_delivered(harness, db_pool):
    service, client = harness
    account_id, headers = await _account(service)
    upstream_closed = asyncio.Event()

    async def drip(reader, writer):  # one token every 50 ms, up to 100; notes when the coordinator hangs up
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(re.search(rb"content-length: (\d+)", head, re.I).group(1)))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        try:
            for _ in range(100):
                writer.write(b'data: {"choices": [{"index": 0, "text": "x", "finish_reason": null}]}\n\n')
                await writer.drain()
                if await _eof_within(reader, 0.05):
                    upstream_closed.set()
                    return
            writer.write(b"data: [DONE]\n\n")
        except ConnectionError:
            upstream_closed.set()
        finally:
            writer.close()

    server, url = await _serve(drip)
    _use(service, url)
    events = []
    # the serving object itself: httpx's ASGI transport hands over a response only once the app finished it
    principal = await service.authenticate(headers["Authorization"])
    stream = await service.start(GenerateRequest(prompt=PROMPT, max_tokens=100, request_id="fb-cancel"), principal)
    async for event in stream:
        events.append(event)
        if len(events) == 3:
            cancelled = await client.delete("/mesh/inference/fb-cancel", headers=headers)
            assert cancelled.json()["status"] == "cancelling"
    await asyncio.wait_for(upstream_closed.wait(), 10)  # the upstream stopped generating
    server.close()
    final = events[-1].model_dump()  # typed events (protocol.StreamEvent); the routes send their model_dump()
    assert final["done"] and final["finish_reason"] == "cancelled" and final["served_by"] == "fallback"
    delivered = len(events) - 1
    assert 3 <= delivered < 100 and final["usage"]["completion_tokens"] == delivered
    prompt_tokens = len(service.models["test/fake"].encode(PROMPT))
    assert Decimal(final["cost_far"]) == delivered * PRICE + prompt_tokens * PROMPT_PRICE
    row = await db_pool.fetchrow("SELECT status, cost_far FROM far_mesh_sessions WHERE account_id = $1",
                                 uuid.UUID(account_id))
    assert row["status"] == "cancelled" and row["cost_far"] == Decimal(final["cost_far"])


async def _eof_within(reader, seconds: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), seconds) == b""
    except asyncio.TimeoutError:
        return False


async def test_tools_that_may_be_called_are_never_sent_to_a_fallback(harness, monkeypatch):
    """A fallback API would not be given the tools (calls are read from the swarm's answer): 503 instead."""
    service, client = harness
    monkeypatch.setattr(service.model("test/fake"), "context_length", 4096)  # the tool prompt fits
    _use(service, "http://127.0.0.1:9/v1")  # never contacted
    _, headers = await _account(service)
    answer = await client.post("/v1/chat/completions", headers=headers, json={
        "model": "test/fake", "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "swarm_not_ready"


async def test_a_request_for_logprobs_is_never_sent_to_the_fallback(harness):
    service, client = harness
    _, headers = await _account(service)
    _use(service, "http://127.0.0.1:9/v1", timeout_s=5)  # nothing listens there
    body = {"prompt": "hi", "max_tokens": 2, "stream": False}
    fell_back = await client.post("/mesh/inference/generate", headers=headers, json=body)
    assert fell_back.json()["error"]["served_by"] == "fallback"  # tried the fallback (which failed)
    refused = await client.post("/mesh/inference/generate", headers=headers, json={**body, "logprobs": 0})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "swarm_not_ready"  # only the swarm has them


def test_sampling_fields_reach_the_fallback_only_when_set():
    _, body = upstream_request(GenerateRequest(prompt="hi"), "m")
    assert not {"temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty"} & set(body)
    _, body = upstream_request(GenerateRequest(prompt="hi", temperature=0.5, repetition_penalty=1.2,
                                               presence_penalty=0.5, frequency_penalty=0.1,
                                               logit_bias={"3": -100}), "m")
    assert (body["temperature"], body["repetition_penalty"], body["presence_penalty"], body["frequency_penalty"],
            body["logit_bias"]) == (0.5, 1.2, 0.5, 0.1, {"3": -100})

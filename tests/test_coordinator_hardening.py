"""Hardening of the coordinator (issue 12), without a swarm: the API runs in process over the scripted engine whose
tokenizer is the tiny model's, against the test PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from decimal import Decimal

import httpx
import pytest
import pytest_asyncio

from services.common.config import ConfigError, Settings
from services.coordinator.accounts import AccountStore, AuthError, check_jwt_secret, issue_jwt
from tests.scripted_engine import Script, ScriptedModel

STRONG_SECRET = "Jq8ZkV2wXr5NtB7mLp3HsY9cDf4GaUeW"  # 32 bytes, not a placeholder
MODEL_ID = "test/fake"
BODY_LIMIT = 1024 * 1024
CONTEXT_LENGTH = 256


# ------------------------------------------------------------------------------------- in-process harness
def scripted_model(tokenizer) -> ScriptedModel:
    """The scripted engine (tests/scripted_engine.py) as these tests use it: "hello world, hello mesh" then EOS (cut at
    max_tokens), no servers metered unless a test sets a route."""
    return ScriptedModel(MODEL_ID, tokenizer, context_length=CONTEXT_LENGTH, script=Script(route=()))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from services.common import petals_adapter  # noqa: F401  (before transformers)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


class Harness:
    def __init__(self, app, service, model, client):
        self.app, self.service, self.model, self.client = app, service, model, client

    async def account(self, balance: str = "100") -> tuple[str, dict]:
        account_id = await self.service.accounts.create_account(f"t-{uuid.uuid4().hex[:8]}", Decimal(balance))
        _, key = await self.service.accounts.create_key(account_id)
        return account_id, {"Authorization": f"Bearer {key}"}


@pytest_asyncio.fixture(loop_scope="session")
async def harness(db_pool, tokenizer):
    """The coordinator's real HTTP app (app.http_app) and InferenceService over the scripted engine, in process."""
    from services.coordinator.app import http_app
    from services.coordinator.serving import InferenceService
    from services.coordinator.store import Pricing, SessionStore

    model = scripted_model(tokenizer)
    service = InferenceService(store=SessionStore(db_pool), accounts=AccountStore(db_pool), limiter=None,
                               models={MODEL_ID: model}, readiness={}, default_model_id=MODEL_ID,
                               pricing=Pricing(Decimal("0.0001"), Decimal(0), 1000),
                               coordinator_id=f"test-{uuid.uuid4().hex[:6]}", jwt_secret="", max_workers=4)
    app = http_app(Settings(JWT_SECRET="", MAX_REQUEST_BODY_BYTES=BODY_LIMIT))
    app.state.service = service
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://coordinator") as client:
        yield Harness(app, service, model, client)
    await service.aclose()


async def call_asgi(app, method: str, path: str, chunks: list[bytes], headers: list[tuple[bytes, bytes]]):
    """Drive the ASGI app with a body sent in ``chunks`` (chunked transfer: no Content-Length). Returns
    (status, parsed JSON body, number of chunks the app pulled)."""
    pulled = 0
    queue = list(chunks)

    async def receive():
        nonlocal pulled
        if not queue:
            await asyncio.sleep(3600)
        pulled += 1
        body = queue.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(queue)}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
             "headers": [(b"host", b"coordinator"), (b"transfer-encoding", b"chunked")] + headers,
             "client": ("127.0.0.1", 1), "server": ("coordinator", 80)}
    await asyncio.wait_for(app(scope, receive, send), timeout=30)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), pulled


# ------------------------------------------------------------------------------------------ JWT secret (2)
@pytest.mark.parametrize("secret", ["dev-only-change-me", "x" * 31, "é" * 15])
def test_coordinator_refuses_to_start_with_a_weak_jwt_secret(secret, capsys):
    from services.coordinator.app import create_app

    with pytest.raises(ConfigError):
        create_app(Settings(JWT_SECRET=secret))
    assert "JWT_SECRET" in capsys.readouterr().err


def test_jwt_secret_default_is_off_and_strong_secrets_start():
    assert Settings().JWT_SECRET == ""
    check_jwt_secret("")  # JWT authentication off
    check_jwt_secret(STRONG_SECRET)
    check_jwt_secret("éàüöñçßøåæ€ÿîôûë")  # 33 bytes in 16 characters


async def test_a_token_signed_with_the_old_default_spends_nothing(db_pool):
    store = AccountStore(db_pool)
    account_id = await store.create_account(f"jwt-{uuid.uuid4().hex[:8]}")
    forged = issue_jwt(account_id, "dev-only-change-me")
    for secret in ("", "dev-only-change-me"):  # off, and (defensively) a weak secret that skipped the check
        with pytest.raises(AuthError):
            await store.authenticate(f"Bearer {forged}", secret)
    principal = await store.authenticate(f"Bearer {issue_jwt(account_id, STRONG_SECRET)}", STRONG_SECRET)
    assert principal.account_id == account_id


# --------------------------------------------------------------------- input bounds, body cap, auth first (1)
async def test_a_prompt_longer_than_the_context_can_hold_is_refused_before_tokenizing(harness):
    from services.coordinator.serving import MAX_CHARS_PER_TOKEN

    _, headers = await harness.account(balance="0")
    limit = CONTEXT_LENGTH * MAX_CHARS_PER_TOKEN
    messages = [{"role": "user", "content": "x" * 1000}] * (limit // 1000 + 1)
    for payload in ({"prompt": "y" * (limit + 1)}, {"messages": messages}):
        response = await harness.client.post("/mesh/inference/generate", json=payload, headers=headers)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "prompt_too_long" and error["max_prompt_chars"] == limit
    chat = await harness.client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": messages},
                                     headers=headers)
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "prompt_too_long"
    assert harness.model.encode_threads == []  # nothing was tokenized


async def test_the_prompt_is_tokenized_off_the_event_loop(harness):
    _, headers = await harness.account(balance="100")
    response = await harness.client.post("/mesh/inference/generate", headers=headers,
                                         json={"prompt": "word " * 300, "stream": False})
    assert response.status_code == 400 and response.json()["error"]["code"] == "prompt_too_long"  # by tokens
    _, empty = await harness.account(balance="0")
    response = await harness.client.post("/mesh/inference/generate", headers=empty,
                                         json={"prompt": "hello", "max_tokens": 4, "stream": False})
    assert response.status_code == 402  # zero balance: refused by the balance floor, before tokenizing
    assert len(harness.model.encode_threads) == 1
    assert all(name.startswith("far-tokenize") for name in harness.model.encode_threads)  # the tokenizer pool


@pytest.mark.parametrize("path", ["/mesh/inference/generate", "/v1/completions", "/v1/chat/completions"])
async def test_a_body_over_the_cap_gets_413_by_content_length_without_being_read(harness, path):
    _, headers = await harness.account()
    big = json.dumps({"prompt": "z" * BODY_LIMIT}).encode()
    for auth in (headers, {}):
        response = await harness.client.post(path, content=big, headers={**auth, "content-type": "application/json"})
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"


async def test_a_chunked_body_is_counted_as_it_arrives(harness):
    _, headers = await harness.account()
    auth = [(b"authorization", headers["Authorization"].encode()), (b"content-type", b"application/json")]
    chunk = b" " * (256 * 1024)
    status, body, pulled = await call_asgi(harness.app, "POST", "/mesh/inference/generate", [chunk] * 20, auth)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert pulled == 5  # refused at the first chunk past 1 MiB, the rest never read
    small = [b'{"prompt": "hello", ', b'"max_tokens": 3, "stream": false}']
    status, body, _ = await call_asgi(harness.app, "POST", "/mesh/inference/generate", small, auth)
    assert status == 200 and body["usage"]["completion_tokens"] == 3


async def test_credentials_are_checked_before_the_body_is_read(harness):
    for path in ("/mesh/inference/generate", "/v1/completions", "/v1/chat/completions"):
        status, body, pulled = await call_asgi(harness.app, "POST", path, [b"{not json"] * 3, [])
        assert status == 401 and body["error"]["code"] == "invalid_credentials"
        assert pulled == 0
    _, headers = await harness.account()
    response = await harness.client.post("/mesh/inference/generate", content=b"{not json", headers=headers)
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"
    response = await harness.client.post("/mesh/inference/generate", json={"prompt": "   "}, headers=headers)
    assert response.status_code == 422 and "prompt is empty" in response.json()["error"]["message"]
    response = await harness.client.post("/mesh/inference/generate", json={"prompt": "x", "max_tokens": 10_000},
                                         headers=headers)
    assert response.status_code == 422 and "max_tokens" in response.json()["error"]["message"]
    response = await harness.client.post("/v1/completions", json={"prompt": ["a", "b"]}, headers=headers)
    # one prompt per request is a rule of the schema (maxItems 1): a 422, like every schema rule
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"


# ------------------------------------------------------------------------- request_id per account (5)
async def test_request_ids_are_idempotency_keys_per_account(harness):
    _, a = await harness.account()
    _, b = await harness.account()
    request_id = f"shared_{uuid.uuid4().hex[:8]}"
    payload = {"prompt": "hello", "max_tokens": 2, "stream": False, "request_id": request_id}
    first = await harness.client.post("/mesh/inference/generate", json=payload, headers=b)  # B takes A's id
    assert first.status_code == 200
    mine = await harness.client.post("/mesh/inference/generate", json={**payload, "max_tokens": 3}, headers=a)
    assert mine.status_code == 200 and mine.json()["usage"]["completion_tokens"] == 3  # A is not blocked
    replay = await harness.client.post("/mesh/inference/generate", json=payload, headers=a)
    assert replay.json()["usage"]["completion_tokens"] == 3  # A's own stored result, not B's
    unknown = f"only_a_{uuid.uuid4().hex[:8]}"
    await harness.client.post("/mesh/inference/generate", json={**payload, "request_id": unknown}, headers=a)
    for method in ("GET", "DELETE"):
        response = await harness.client.request(method, f"/mesh/inference/{unknown}", headers=b)
        assert response.status_code == 404 and response.json()["error"]["code"] == "request_not_found"
    status = await harness.client.get(f"/mesh/inference/{request_id}", headers=a)
    assert status.json()["tokens_generated"] == 3


async def test_another_account_cannot_see_or_cancel_a_running_request(harness):
    _, a = await harness.account()
    _, b = await harness.account()
    hold = threading.Event()
    harness.model.script = Script(route=(), hold=hold)
    request_id = f"running_{uuid.uuid4().hex[:8]}"
    task = asyncio.create_task(harness.client.post(
        "/mesh/inference/generate", headers=a,
        json={"prompt": "hello", "max_tokens": 2, "stream": False, "request_id": request_id}))
    try:
        for _ in range(200):
            if any(key[1] == request_id for key in harness.service.active):
                break
            await asyncio.sleep(0.05)
        assert (await harness.client.get(f"/mesh/inference/{request_id}", headers=a)).json()["status"] == "running"
        for method in ("GET", "DELETE"):
            response = await harness.client.request(method, f"/mesh/inference/{request_id}", headers=b)
            assert response.status_code == 404
    finally:
        hold.set()
    done = await task
    assert done.status_code == 200 and done.json()["finish_reason"] == "length"  # not cancelled by B


async def test_the_database_keeps_request_ids_unique_per_account(db_pool):
    import asyncpg

    store = AccountStore(db_pool)
    a, b = [await store.create_account(f"u-{uuid.uuid4().hex[:8]}") for _ in range(2)]
    request_id = f"db_{uuid.uuid4().hex[:8]}"
    insert = ("INSERT INTO far_mesh_sessions (request_id, account_id, model_id, price_per_token_far, "
              "price_per_prompt_token_far, platform_fee_bps) VALUES ($1, $2, 'm', 0, 0, 0)")
    await db_pool.execute(insert, request_id, uuid.UUID(a))
    await db_pool.execute(insert, request_id, uuid.UUID(b))
    await db_pool.execute(insert, request_id, None)
    for account in (uuid.UUID(a), None):
        with pytest.raises(asyncpg.UniqueViolationError):
            await db_pool.execute(insert, request_id, account)


# --------------------------------------------------------------------------- failure messages (7)
async def test_a_swarm_failure_reaches_the_client_as_a_stable_code_without_the_raw_error(harness):
    _, headers = await harness.account()
    harness.model.script = Script(route=(), fail_at=2)
    streamed = await harness.client.post("/mesh/inference/generate", headers=headers,
                                         json={"prompt": "hello", "max_tokens": 4})
    whole = await harness.client.post("/mesh/inference/generate", headers=headers,
                                      json={"prompt": "hello", "max_tokens": 4, "stream": False})
    chat = await harness.client.post("/v1/chat/completions", headers=headers,
                                     json={"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}],
                                           "max_tokens": 4, "stream": True})
    assert "event: error" in streamed.text and whole.status_code == 502
    error_body = [line for line in streamed.text.splitlines() if line.startswith("data:") and "error" in line]
    errors = [json.loads(error_body[0][5:])["error"], whole.json()["error"]]
    for error in errors:
        assert error["code"] == "swarm_error" and error["tokens_generated"] == 1
    for text in (streamed.text, whole.text, chat.text):
        for secret in ("QmSecretPeer", "10.0.0.7", "Traceback", "P2PDaemonError", "hivemind"):
            assert secret not in text
    assert "swarm_error" in chat.text


async def test_no_live_server_ends_the_stream_swarm_unavailable_billing_what_was_delivered(harness, db_pool):
    """Issue 14: a server of the route died and nobody else holds its blocks: the stream ends with
    ``event: error`` swarm_unavailable "blocks 2:4: no live server"; the user pays for the tokens delivered, the
    servers for the steps they computed, and the session shows the server that could not be replaced."""
    from services.common.petals_adapter import SwarmUnavailable

    account_id, headers = await harness.account("10")
    harness.model.script = Script(
        route=(("QmFirstHalf", 0, 2), ("QmDeadServer", 2, 4)), fail_at=4,
        error=lambda: SwarmUnavailable(2, 4),
        failover={"peer_id": "QmDeadServer", "blocks": "2:4", "cause": "died", "replaced_by": None, "stall_s": None,
                  "error": "ServerStreamClosed()"})
    streamed = await harness.client.post("/mesh/inference/generate", headers=headers,
                                         json={"prompt": "hello", "max_tokens": 5, "request_id": "dead_2_4"})
    events, name = [], None
    for line in streamed.text.splitlines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            events.append((name, json.loads(line[5:])))
            name = None
    tokens = [data for name, data in events if name != "error"]
    assert len(tokens) == 3
    assert events[-1][0] == "error"
    error = events[-1][1]["error"]
    assert error["code"] == "swarm_unavailable" and error["message"] == "blocks 2:4: no live server"
    assert error["tokens_generated"] == 3 and error["cost_far"] == "0.0003"
    assert error["replaced_servers"] == [{"peer_id": "QmDeadServer", "blocks": "2:4", "cause": "died",
                                          "replaced_by": None, "stall_ms": None}]
    session = await db_pool.fetchrow("SELECT * FROM far_mesh_sessions WHERE request_id = 'dead_2_4'")
    assert session["status"] == "failed" and session["completion_tokens"] == 3
    assert session["cost_far"] == Decimal("0.0003")
    paid = {r["peer_id"]: r for r in await db_pool.fetch(
        "SELECT * FROM far_session_contributions WHERE session_id = $1", session["session_id"])}
    units = 2 * (session["prompt_tokens"] + 2)  # 2 blocks × (the prompt's positions, then one per step)
    assert {p: (r["steps"], r["work_units"]) for p, r in paid.items()} == {"QmFirstHalf": (3, units),
                                                                          "QmDeadServer": (3, units)}
    assert session["fee_far"] + sum(r["payment_far"] for r in paid.values()) == session["cost_far"]
    account = await _account_row(db_pool, account_id)
    assert account["balance_far"] == Decimal("10") - Decimal("0.0003") and account["reserved_far"] == 0
    status = (await harness.client.get("/mesh/inference/dead_2_4", headers=headers)).json()
    assert status["status"] == "failed" and status["replaced_servers"] == error["replaced_servers"]


# ------------------------------------------------------------ finalize retried, stale sessions swept (6)
async def _account_row(db_pool, account_id):
    return await db_pool.fetchrow("SELECT balance_far, reserved_far FROM far_accounts WHERE account_id = $1",
                                  uuid.UUID(account_id))


async def test_a_failed_finalize_is_retried_with_backoff(harness, db_pool, monkeypatch):
    import services.coordinator.serving as serving

    monkeypatch.setattr(serving, "FINALIZE_BACKOFF_S", 0.01)
    account_id, headers = await harness.account(balance="1")
    real, calls = harness.service.store.finalize, []

    async def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise ConnectionResetError("postgres went away")
        return await real(*args, **kwargs)

    monkeypatch.setattr(harness.service.store, "finalize", flaky)
    response = await harness.client.post("/mesh/inference/generate", headers=headers,
                                         json={"prompt": "hello", "max_tokens": 3, "stream": False})
    assert response.status_code == 200 and response.json()["finish_reason"] == "length"
    assert len(calls) == 3
    account = await _account_row(db_pool, account_id)
    assert account["reserved_far"] == 0 and account["balance_far"] == Decimal("0.9997")


async def test_a_finalize_that_keeps_failing_is_settled_once_by_the_stale_sweep(harness, db_pool, monkeypatch):
    import services.coordinator.serving as serving

    monkeypatch.setattr(serving, "FINALIZE_BACKOFF_S", 0.001)
    account_id, headers = await harness.account(balance="1")

    async def down(*args, **kwargs):
        raise ConnectionResetError("postgres went away")

    monkeypatch.setattr(harness.service.store, "finalize", down)
    request_id = f"unsaved_{uuid.uuid4().hex[:8]}"
    payload = {"prompt": "hello", "max_tokens": 3, "stream": False, "request_id": request_id}
    response = await harness.client.post("/mesh/inference/generate", headers=headers, json=payload)
    assert response.status_code == 503 and response.json()["error"]["code"] == "settlement_pending"
    assert (await _account_row(db_pool, account_id))["reserved_far"] > 0  # money held, session running
    again = await harness.client.post("/mesh/inference/generate", headers=headers, json=payload)
    assert again.status_code == 409 and again.json()["error"]["code"] == "request_in_progress"

    monkeypatch.undo()
    assert await harness.service.store.sweep_stale(0) >= 1  # any coordinator's stale sessions
    row = await db_pool.fetchrow("SELECT status, completion_tokens, cost_far FROM far_mesh_sessions "
                                 "WHERE request_id = $1", request_id)
    assert row["status"] == "interrupted" and row["completion_tokens"] == 3 and row["cost_far"] == Decimal("0.0003")
    account = await _account_row(db_pool, account_id)
    assert account["reserved_far"] == 0 and account["balance_far"] == Decimal("0.9997")
    await harness.service.store.sweep_stale(0)
    assert (await _account_row(db_pool, account_id))["balance_far"] == Decimal("0.9997")  # settled once
    again = await harness.client.post("/mesh/inference/generate", headers=headers, json=payload)
    assert again.status_code == 409 and again.json()["error"]["code"] == "request_failed"


async def test_concurrent_sweeps_finalize_each_stale_session_exactly_once(harness, db_pool):
    from services.coordinator.store import SessionStore

    store: SessionStore = harness.service.store
    account_id, _ = await harness.account(balance="1")
    sessions = []
    for i in range(12):
        session_id = await store.create_session(
            request_id=f"orphan_{uuid.uuid4().hex[:8]}", model_id=MODEL_ID, pricing=harness.service.pricing,
            prompt_tokens=1, account_id=account_id, reserved_far=Decimal("0.001"),
            coordinator_id=f"dead-coordinator-{i % 3}")
        await store.checkpoint(session_id, 2, [])
        sessions.append(session_id)
    # not stale yet: a live coordinator's sessions are left alone
    assert not await db_pool.fetchval("SELECT count(*) FROM far_mesh_sessions WHERE session_id = ANY($1::uuid[]) "
                                      "AND status <> 'running'", sessions)
    await asyncio.gather(*[store.sweep_stale(3600) for _ in range(2)])
    assert await db_pool.fetchval("SELECT count(*) FROM far_mesh_sessions WHERE session_id = ANY($1::uuid[]) "
                                  "AND status = 'running'", sessions) == 12
    # three "coordinators" sweeping at once, and the background task of a fourth
    task = asyncio.create_task(harness.service.sweep_stale_sessions(interval_s=0.02, stale_after_s=0))
    try:
        await asyncio.gather(*[store.sweep_stale(0) for _ in range(3)])
        for _ in range(100):
            if not await db_pool.fetchval("SELECT count(*) FROM far_mesh_sessions WHERE status = 'running' "
                                          "AND session_id = ANY($1::uuid[])", sessions):
                break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
    rows = await db_pool.fetch("SELECT status, cost_far FROM far_mesh_sessions WHERE session_id = ANY($1::uuid[])",
                               sessions)
    assert {r["status"] for r in rows} == {"interrupted"} and {r["cost_far"] for r in rows} == {Decimal("0.0002")}
    account = await _account_row(db_pool, account_id)
    assert account["reserved_far"] == 0 and account["balance_far"] == Decimal("1") - 12 * Decimal("0.0002")

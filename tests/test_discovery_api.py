"""Discovery API against real Postgres and Redis (the app in process through httpx's ASGI transport)."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from services.common.config import load_settings
from services.common.identity import (HARDWARE_FIELDS, NodeIdentity, create_identity, load_identity,
                                      peer_id_from_public_key, registration_message)
from services.discovery.app import create_app

MODEL_ID = "far-mesh/tiny-llama"
WALLET = "0x" + "ab" * 20
TTL_S = 2.0


@pytest.fixture(scope="module")
def identities(tmp_path_factory):
    base = tmp_path_factory.mktemp("ids")
    result = []
    for i in range(4):
        create_identity(base / f"{i}.key")
        result.append(load_identity(base / f"{i}.key"))
    return result


@pytest_asyncio.fixture
async def api(clean_db, postgres_url, redis_url):
    settings = load_settings(POSTGRES_URL=postgres_url, REDIS_URL=redis_url, FAR_MESH_DHT_BOOTSTRAP="",
                             NODE_HEARTBEAT_TTL_S=TTL_S, DISCOVERY_FLUSH_INTERVAL_S=0.3,
                             DISCOVERY_CHALLENGES_PER_MINUTE=100_000,  # one client address for every test
                             DISCOVERY_CHALLENGES_PER_PEER_PER_MINUTE=100_000)
    app = create_app(settings, models={MODEL_ID: 4, "org/big": 32})
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://discovery") as client:
            client.app = app
            yield client


HARDWARE = {"gpu": "none", "vram_total_gb": 0, "ram_total_gb": 8, "device": "cpu"}


async def register(client, identity, *, wallet=WALLET, span=(0, 2), model_id=MODEL_ID, name="a",
                   hardware=HARDWARE, sign_with=None, nonce=None, tamper=None, **overrides):
    """Sign and send a registration; ``overrides`` and ``tamper`` replace body fields AFTER signing."""
    if nonce is None:
        r = await client.get("/nodes/challenge", params={"peer_id": identity.peer_id})
        assert r.status_code == 200, r.text
        assert r.json()["expires_in_s"] == 120
        nonce = r.json()["nonce"]
    signable = isinstance(hardware, dict) and set(hardware) <= set(HARDWARE_FIELDS)  # else refused before
    message = registration_message(nonce=nonce, peer_id=identity.peer_id, wallet_address=wallet,
                                   model_id=model_id, start_block=span[0], end_block=span[1], public_name=name,
                                   hardware=hardware if signable else HARDWARE)
    signer = sign_with or identity
    body = {"peer_id": identity.peer_id, "wallet_address": wallet, "model_id": model_id, "start_block": span[0],
            "end_block": span[1], "public_name": name, "hardware": hardware,
            "public_key": signer.public_key_b64, "signature": signer.sign(message), "nonce": nonce}
    body.update(overrides)
    body.update(tamper or {})
    return await client.post("/nodes/register", json=body), nonce


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def error_code(response) -> str:
    return response.json()["error"]["code"]


async def test_register_heartbeat_active_and_node_view(api, identities, db_pool):
    ident = identities[0]
    r, _ = await register(api, ident)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"node_id", "node_token", "heartbeat_interval_s"} and body["heartbeat_interval_s"] == 30
    row = await db_pool.fetchrow("SELECT * FROM far_nodes WHERE peer_id = $1", ident.peer_id)
    assert row["state"] == "online" and str(row["node_id"]) == body["node_id"]
    assert row["node_token_hash"] and body["node_token"] not in row["node_token_hash"]
    seen_at_register = row["last_seen"]

    await asyncio.sleep(0.05)
    r = await api.post("/nodes/heartbeat", json={"tokens_served": 12, "vram_used_gb": 1.5, "gpu_temp_c": 40,
                                                 "state": "online"}, headers=bearer(body["node_token"]))
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True, "node_id": body["node_id"], "heartbeat_interval_s": 30, "tokens_served": 0,
                        "earned_far": "0", "state": "online"}
    # write-behind: Postgres catches up after a flush, through update_node_last_seen()
    await api.app.state.discovery.flush()
    row = await db_pool.fetchrow("SELECT * FROM far_nodes WHERE peer_id = $1", ident.peer_id)
    assert row["last_seen"] > seen_at_register
    assert row["tokens_served"] == 12 and row["vram_used_gb"] == Decimal("1.5")

    r = await api.get("/nodes/active")
    nodes = r.json()["nodes"]
    assert [n["peer_id"] for n in nodes] == [ident.peer_id]
    assert nodes[0]["blocks"] == "0:2" and nodes[0]["active"] and nodes[0]["hardware"]["ram_total_gb"] == 8
    assert nodes[0]["wallet_address"] == WALLET and nodes[0]["reported_state"] == "online"

    for path in (f"/nodes/{body['node_id']}", f"/nodes/by-peer/{ident.peer_id}"):
        r = await api.get(path)
        assert r.status_code == 200, r.text
        view = r.json()
        assert view["state"] == "online" and view["active"] and view["uptime_s"] >= 0
        assert view["earned_far"] == "0" and view["last_payout"] is None and view["vram_used_gb"] == 1.5

    r = await api.get(f"/models/{MODEL_ID}/nodes")
    assert r.status_code == 200 and r.json()["count"] == 1 and r.json()["num_blocks"] == 4

    r = await api.get("/metrics")
    assert 'far_discovery_heartbeats_total{result="ok"} 1.0' in r.text
    assert "far_discovery_nodes_online 1.0" in r.text
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    assert (await api.get("/readyz")).status_code == 200


async def test_reregistration_rotates_token_and_updates_span(api, identities, db_pool):
    ident = identities[0]
    first, _ = await register(api, ident)
    second, _ = await register(api, ident, span=(2, 4), wallet="0x" + "cd" * 20)
    assert second.status_code == 200
    assert first.json()["node_id"] == second.json()["node_id"]
    assert (await api.post("/nodes/heartbeat", json={}, headers=bearer(first.json()["node_token"]))).status_code == 401
    assert (await api.post("/nodes/heartbeat", headers=bearer(second.json()["node_token"]))).status_code == 200
    row = await db_pool.fetchrow("SELECT start_block, end_block, wallet_address FROM far_nodes")
    assert tuple(row) == (2, 4, "0x" + "cd" * 20)
    assert await db_pool.fetchval("SELECT count(*) FROM far_nodes") == 1


async def test_forged_other_key_and_replayed_proofs_are_refused(api, identities, db_pool):
    victim, attacker = identities[0], identities[1]
    # signed by another key (whose public key does not hash to the peer ID)
    r, _ = await register(api, victim, sign_with=attacker)
    assert r.status_code == 401 and error_code(r) == "invalid_signature"
    # the victim's public key but a signature by the attacker
    r = await api.get("/nodes/challenge", params={"peer_id": victim.peer_id})
    nonce = r.json()["nonce"]
    msg = registration_message(nonce=nonce, peer_id=victim.peer_id, wallet_address=WALLET, model_id=MODEL_ID,
                               start_block=0, end_block=2, public_name="a", hardware=HARDWARE)
    r, _ = await register(api, victim, nonce=nonce, signature=attacker.sign(msg))
    assert r.status_code == 401 and "signature" in r.json()["error"]["message"]
    # garbage signature / key
    r, _ = await register(api, victim, signature="not base64!!")
    assert r.status_code == 401
    # a valid proof whose signed fields were changed (wallet swapped after signing)
    r = await api.get("/nodes/challenge", params={"peer_id": victim.peer_id})
    nonce = r.json()["nonce"]
    msg = registration_message(nonce=nonce, peer_id=victim.peer_id, wallet_address=WALLET, model_id=MODEL_ID,
                               start_block=0, end_block=2, public_name="a", hardware=HARDWARE)
    r, _ = await register(api, victim, nonce=nonce, signature=victim.sign(msg), wallet_address="0x" + "ee" * 20)
    assert r.status_code == 401
    # nonce issued for another peer
    r = await api.get("/nodes/challenge", params={"peer_id": attacker.peer_id})
    r, _ = await register(api, victim, nonce=r.json()["nonce"])
    assert r.status_code == 401 and "another peer_id" in r.json()["error"]["message"]
    # made-up nonce
    r, _ = await register(api, victim, nonce="00" * 32)
    assert r.status_code == 401 and "nonce" in r.json()["error"]["message"]
    assert await db_pool.fetchval("SELECT count(*) FROM far_nodes") == 0
    # replay: a valid proof works once, never twice
    r, nonce = await register(api, victim)
    assert r.status_code == 200
    r, _ = await register(api, victim, nonce=nonce)
    assert r.status_code == 401 and "already used" in r.json()["error"]["message"]
    metrics = (await api.get("/metrics")).text
    assert 'far_discovery_registrations_total{result="refused"} 7.0' in metrics


async def test_bad_input_is_4xx_with_reason(api, identities):
    ident = identities[0]
    cases = []
    r = await api.get("/nodes/challenge", params={"peer_id": "QmNotAPeer"})
    cases.append((r, 422, "invalid_peer_id"))
    r = await api.get("/nodes/challenge")
    cases.append((r, 422, "invalid_request"))
    r, _ = await register(api, ident, wallet_address="0x1234")
    cases.append((r, 422, "invalid_request"))
    assert "wallet_address: must be 0x followed by 40 hex digits" in r.json()["error"]["message"]
    r, _ = await register(api, ident, peer_id="12D3KooWabc")
    cases.append((r, 422, "invalid_request"))
    assert "peer_id: must be a base58 libp2p peer ID" in r.json()["error"]["message"]
    r, _ = await register(api, ident, model_id="nope/model")
    cases.append((r, 404, "model_not_found"))
    r, _ = await register(api, ident, span=(2, 6))
    cases.append((r, 422, "invalid_span"))
    r, _ = await register(api, ident, span=(3, 3))
    cases.append((r, 422, "invalid_span"))
    r, _ = await register(api, ident, start_block=-1)
    cases.append((r, 422, "invalid_request"))
    r, _ = await register(api, ident, hardware="lots")
    cases.append((r, 422, "invalid_request"))
    r, _ = await register(api, ident, wallet="0x" + "aB" * 20)  # mixed case, wrong EIP-55 checksum
    cases.append((r, 422, "invalid_request"))
    assert "EIP-55" in r.json()["error"]["message"]
    r = await api.post("/nodes/register", content=b"{not json", headers={"content-type": "application/json"})
    cases.append((r, 422, "invalid_request"))
    r = await api.post("/nodes/register", content=b"x" * (65 * 1024), headers={"content-type": "application/json"})
    cases.append((r, 413, "request_too_large"))

    async def chunked():
        for _ in range(70):
            yield b"x" * 1024

    r = await api.post("/nodes/heartbeat", content=chunked(), headers=bearer("fn_x"))
    cases.append((r, 413, "request_too_large"))
    r = await api.get("/models/nope/model/coverage")
    cases.append((r, 404, "model_not_found"))
    r = await api.get("/models/nope/nodes")
    cases.append((r, 404, "model_not_found"))
    r = await api.get("/nodes/active", params={"model_id": "nope"})
    cases.append((r, 404, "model_not_found"))
    for suffix in ("stats", "earnings", "payments", "nodes", "checks"):
        r = await api.get(f"/provider/0xZZ/{suffix}")
        cases.append((r, 422, "invalid_wallet"))
    r = await api.get("/nodes/not-a-uuid")  # only a UUID routes to a node (so GET /nodes/register is a 405)
    cases.append((r, 404, "http_404"))
    r = await api.get("/nodes/register")
    cases.append((r, 405, "http_405"))
    assert r.headers["allow"] == "POST"
    r = await api.get("/nodes/00000000-0000-0000-0000-000000000000")
    cases.append((r, 404, "node_not_found"))
    r = await api.get("/nodes/by-peer/Qm123")
    cases.append((r, 422, "invalid_peer_id"))
    r = await api.post("/nodes/heartbeat", json={})
    cases.append((r, 401, "missing_token"))
    r = await api.post("/nodes/heartbeat", json={}, headers=bearer("fn_unknown"))
    cases.append((r, 401, "invalid_token"))
    r = await api.post("/nodes/heartbeat", json={}, headers={"Authorization": "Basic abc"})
    cases.append((r, 401, "invalid_token"))
    r = await api.post("/nodes/unregister", headers=bearer("fn_unknown"))
    cases.append((r, 401, "invalid_token"))
    good, _ = await register(api, ident)
    token = good.json()["node_token"]
    r = await api.post("/nodes/heartbeat", json={"state": "sleeping"}, headers=bearer(token))
    cases.append((r, 422, "invalid_request"))
    r = await api.post("/nodes/heartbeat", json={"tokens_served": -5}, headers=bearer(token))
    cases.append((r, 422, "invalid_request"))
    r = await api.post("/nodes/heartbeat", json=[1, 2], headers=bearer(token))
    cases.append((r, 422, "invalid_request"))
    for response, status, code in cases:
        assert response.status_code == status, (response.request.url, response.text)
        assert error_code(response) == code, response.text
        assert response.json()["error"]["message"]


async def test_wallet_checksum(api, identities, db_pool):
    """A mixed-case wallet must be a valid EIP-55 checksum (one mistyped character would be paid to an address nobody
    controls); all-lowercase and all-uppercase hex carry no checksum and are accepted."""
    from eth_utils import to_checksum_address

    good = to_checksum_address("0x" + "5a" * 19 + "0b")
    typo = good[:-1] + ("B" if good[-1] == "b" else "b")  # one letter's case flipped
    r, _ = await register(api, identities[0], wallet=typo)
    assert r.status_code == 422 and "EIP-55 checksum" in r.json()["error"]["message"], r.text
    for wallet in (good, good.lower(), "0x" + good[2:].upper()):
        r, _ = await register(api, identities[0], wallet=wallet)
        assert r.status_code == 200, (wallet, r.text)
        assert await db_pool.fetchval("SELECT wallet_address FROM far_nodes") == wallet


async def test_hardware_is_whitelisted_and_signed_with_public_name(api, identities, db_pool):
    ident = identities[0]
    # Extra fields (a 50 KB junk field was once stored and published) are refused, as are unbounded values.
    for hardware in ({**HARDWARE, "junk": "x" * 50_000}, {**HARDWARE, "gpu": "g" * 201},
                     {**HARDWARE, "vram_total_gb": 1e9}, {**HARDWARE, "ram_total_gb": -1}):
        r, _ = await register(api, ident, hardware=hardware)
        assert r.status_code == 422 and error_code(r) == "invalid_request", r.text
    # hardware and public_name are covered by the signature: changed after signing -> refused.
    r, _ = await register(api, ident, hardware=HARDWARE, public_name="someone else")
    assert r.status_code == 401 and error_code(r) == "invalid_signature"
    r, _ = await register(api, ident, hardware={**HARDWARE, "gpu": "NVIDIA H200"}, name="a")
    assert r.status_code == 200  # signed as sent
    r, _ = await register(api, ident, name="a", hardware={**HARDWARE, "gpu": "NVIDIA H200"},
                          tamper={"hardware": {**HARDWARE, "gpu": "NVIDIA B200"}})
    assert r.status_code == 401
    assert await db_pool.fetchval("SELECT count(*) FROM far_nodes") == 1
    node = (await api.get("/nodes/active")).json()["nodes"][0]
    assert node["hardware"] == {"gpu": "NVIDIA H200", "vram_total_gb": 0.0, "ram_total_gb": 8.0, "device": "cpu"}
    assert node["public_name"] == "a"


async def test_challenges_are_rate_limited_per_client(api):
    """Each challenge is a Redis key for 120 s: at most DISCOVERY_CHALLENGES_PER_MINUTE per client address, then 429
    with Retry-After."""
    discovery = api.app.state.discovery
    discovery.settings = discovery.settings.model_copy(update={"DISCOVERY_CHALLENGES_PER_MINUTE": 3})
    peer = "Qm" + "a" * 44

    def client_at(address: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=api.app, client=(address, 4000)),
                                 base_url="http://discovery")

    async with client_at("203.0.113.7") as noisy, client_at("203.0.113.8") as other:
        for _ in range(3):
            assert (await noisy.get("/nodes/challenge", params={"peer_id": peer})).status_code == 200
        r = await noisy.get("/nodes/challenge", params={"peer_id": peer})
        assert r.status_code == 429 and error_code(r) == "rate_limited", r.text
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        assert (await other.get("/nodes/challenge", params={"peer_id": peer})).status_code == 200


async def test_challenge_limit_is_keyed_on_the_real_client_behind_a_trusted_proxy(api):
    """Behind the deploy's reverse proxy every request comes from the proxy's address: one client must not exhaust
    the challenges of everyone. X-Forwarded-For is honoured only from a trusted proxy (a client sending it directly
    cannot pick a fresh address per request), and a peer ID has a limit of its own."""
    from services.common.proxies import TrustedProxies

    discovery = api.app.state.discovery
    discovery.settings = discovery.settings.model_copy(update={"DISCOVERY_CHALLENGES_PER_MINUTE": 3,
                                                               "DISCOVERY_CHALLENGES_PER_PEER_PER_MINUTE": 2})
    discovery.proxies = TrustedProxies("10.9.0.0/16")

    def client_at(address: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=api.app, client=(address, 4000)),
                                 base_url="http://discovery")

    def peer(i: int) -> str:
        return "Qm" + "a" * 43 + "bcdefghijkmnpqrstuvwxyz"[i]

    async def challenge(client, i, forwarded=None):
        headers = {"X-Forwarded-For": forwarded} if forwarded else {}
        return (await client.get("/nodes/challenge", params={"peer_id": peer(i)}, headers=headers)).status_code

    async with client_at("10.9.0.2") as proxy, client_at("203.0.113.50") as direct:
        # One noisy client behind the proxy is limited; another client behind the same proxy is not.
        assert [await challenge(proxy, i, "198.51.100.1") for i in range(4)] == [200, 200, 200, 429]
        assert await challenge(proxy, 5, "198.51.100.2") == 200
        # A spoofed header in front of the proxy's own entry changes nothing: the rightmost untrusted hop counts.
        assert await challenge(proxy, 6, "1.2.3.4, 198.51.100.1") == 429
        # Not from a trusted proxy: the header is ignored, the TCP peer is the client.
        assert [await challenge(direct, 7 + i, f"192.0.2.{i}") for i in range(4)] == [200, 200, 200, 429]
        # Per peer ID: at most 2 a minute, whoever asks.
        assert [await challenge(proxy, 12, f"198.51.100.{10 + i}") for i in range(3)] == [200, 200, 429]


def _identity_with(key) -> NodeIdentity:
    """A NodeIdentity around any RSA key (create_identity always makes 2048-bit keys with e = 65537)."""
    from cryptography.hazmat.primitives import serialization
    from hivemind.proto import crypto_pb2

    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    public = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=spki).SerializeToString()
    return NodeIdentity(Path("/dev/null"), peer_id_from_public_key(public), public, key)


async def test_only_rsa_2048_to_4096_with_e_65537_verified_off_the_event_loop(api, identities, db_pool, monkeypatch):
    """Node identities are RSA 2048 / e = 65537 (hivemind, create_identity). Bigger keys or exponents make a verify far
    more expensive: refused before verifying. The verify itself runs in a worker thread, not on the event loop."""
    import threading

    from cryptography.hazmat.primitives.asymmetric import rsa

    from services.discovery import service as service_module

    for key in (rsa.generate_private_key(public_exponent=65537, key_size=1024),
                rsa.generate_private_key(public_exponent=3, key_size=2048)):
        r, _ = await register(api, _identity_with(key))
        assert r.status_code == 401 and "unacceptable identity key" in r.json()["error"]["message"], r.text

    threads = []
    verify = service_module.verify_signature

    def recording_verify(**kwargs):
        threads.append(threading.current_thread())
        return verify(**kwargs)

    monkeypatch.setattr(service_module, "verify_signature", recording_verify)
    big = _identity_with(rsa.generate_private_key(public_exponent=65537, key_size=4096))
    for identity in (identities[0], big):
        r, _ = await register(api, identity)
        assert r.status_code == 200, r.text
    assert len(threads) == 2 and all(t is not threading.main_thread() for t in threads)
    assert await db_pool.fetchval("SELECT count(*) FROM far_nodes") == 2


class _LoopTransport(httpx.BaseTransport):
    """A sync httpx transport (the node's DiscoveryClient is sync) that sends each request through the test's async
    ASGI client on the test's event loop (the client runs in a worker thread)."""

    def __init__(self, client: httpx.AsyncClient, loop: asyncio.AbstractEventLoop):
        self.client, self.loop = client, loop

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def send():
            return await self.client.request(request.method, request.url.raw_path.decode(), content=request.read(),
                                             headers={k: v for k, v in request.headers.items() if k != "host"})

        answer = asyncio.run_coroutine_threadsafe(send(), self.loop).result(30)
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)


async def test_the_node_signer_registers_with_the_real_discovery(api, identities, db_pool):
    """node_server's DiscoveryClient (the signer the agent uses) against the real discovery app: integer and None
    hardware values as the agent builds them, a public name with non-ASCII characters."""
    from node_server.discovery_client import DiscoveryClient

    client = DiscoveryClient("http://discovery", transport=_LoopTransport(api, asyncio.get_running_loop()))
    try:
        registration = await asyncio.to_thread(
            client.register, identities[2], wallet_address=WALLET, model_id=MODEL_ID, start_block=1, end_block=3,
            public_name="Zoë's \"node\"\nline", hardware={"gpu": None, "vram_total_gb": None, "ram_total_gb": 16,
                                                        "device": "cpu"})
    finally:
        client.close()
    row = await db_pool.fetchrow("SELECT * FROM far_nodes WHERE peer_id = $1", identities[2].peer_id)
    assert str(row["node_id"]) == registration.node_id and row["public_name"] == "Zoë's \"node\"\nline"
    assert (row["start_block"], row["end_block"]) == (1, 3)
    r = await api.post("/nodes/heartbeat", json={"state": "online"}, headers=bearer(registration.node_token))
    assert r.status_code == 200, r.text


async def test_work_of_a_node_that_unregistered_is_paid_never_registered_peer_is_not(api, identities, db_pool):
    """The payment rule (docs/discovery.md "Who is paid"): the coordinator's checkpoint links a peer's work to its
    registration whatever the registration's state (a node that unregistered, state offline, is paid for work its
    server still does, to the wallet it registered); a peer that never registered earns nothing."""
    import uuid

    from services.coordinator.metering import PeerWork
    from services.coordinator.store import SessionStore

    left, parked, stranger = identities[0], identities[1], "Qm" + "z" * 44
    r, _ = await register(api, left)
    assert (await api.post("/nodes/unregister", headers=bearer(r.json()["node_token"]))).status_code == 200
    r, _ = await register(api, parked, wallet="0x" + "cd" * 20, span=(2, 4))
    # 'unregistered' is an allowed far_nodes state too (nothing writes it today): same rule.
    await db_pool.execute("UPDATE far_nodes SET state = 'unregistered' WHERE peer_id = $1", parked.peer_id)
    session_id = str(uuid.uuid4())
    await db_pool.execute(
        "INSERT INTO far_mesh_sessions (session_id, request_id, model_id, price_per_token_far, "
        "price_per_prompt_token_far, platform_fee_bps) VALUES ($1, $2, $3, 1, 0, 0)",
        uuid.UUID(session_id), f"req-{session_id}", MODEL_ID)
    await SessionStore(db_pool).checkpoint(session_id, 10, [
        PeerWork(left.peer_id, 10, 5, {(0, 2)}), PeerWork(parked.peer_id, 10, 5, {(2, 4)}),
        PeerWork(stranger, 20, 5, {(0, 4)})])
    await db_pool.execute("SELECT finalize_session($1, 'completed', 'length', 0, 10)", uuid.UUID(session_id))
    rows = {row["peer_id"]: row for row in await db_pool.fetch(
        "SELECT c.peer_id, c.node_id, c.wallet_address, c.payment_far, n.state FROM far_session_contributions c "
        "LEFT JOIN far_nodes n USING (node_id)")}
    assert rows[left.peer_id]["state"] == "offline" and rows[left.peer_id]["wallet_address"] == WALLET
    assert rows[parked.peer_id]["state"] == "unregistered" and rows[parked.peer_id]["wallet_address"] == "0x" + "cd" * 20
    assert rows[left.peer_id]["payment_far"] == rows[parked.peer_id]["payment_far"] == Decimal("2.5")
    assert rows[stranger]["node_id"] is None and rows[stranger]["payment_far"] == 0


async def test_silent_node_drops_out_of_active_within_ttl(api, identities):
    a, b = identities[0], identities[1]
    ra, _ = await register(api, a, name="a")
    rb, _ = await register(api, b, span=(2, 4), name="b")
    token_b = rb.json()["node_token"]
    deadline = time.monotonic() + TTL_S + 1.5
    gone_after = None
    started = time.monotonic()
    while time.monotonic() < deadline:
        await api.post("/nodes/heartbeat", json={"state": "online"}, headers=bearer(token_b))  # b keeps beating
        peers = {n["peer_id"] for n in (await api.get("/nodes/active")).json()["nodes"]}
        assert b.peer_id in peers
        if a.peer_id not in peers and gone_after is None:
            gone_after = time.monotonic() - started
        await asyncio.sleep(0.2)
    assert gone_after is not None and gone_after <= TTL_S + 0.5
    # the node view says why
    view = (await api.get(f"/nodes/{ra.json()['node_id']}")).json()
    assert view["active"] is False and view["state"] == "online" and view["seconds_since_heartbeat"] > TTL_S
    # a heartbeat brings it back (a new online streak)
    assert (await api.post("/nodes/heartbeat", headers=bearer(ra.json()["node_token"]))).status_code == 200
    peers = {n["peer_id"] for n in (await api.get("/nodes/active")).json()["nodes"]}
    assert peers == {a.peer_id, b.peer_id}


async def test_unregister_leaves_active_immediately(api, identities, db_pool):
    ident = identities[2]
    r, _ = await register(api, ident)
    token, node_id = r.json()["node_token"], r.json()["node_id"]
    await api.post("/nodes/heartbeat", json={"tokens_served": 1}, headers=bearer(token))  # pending write-behind
    r = await api.post("/nodes/unregister", headers=bearer(token))
    assert r.status_code == 200 and r.json() == {"ok": True, "node_id": node_id, "state": "offline"}
    assert (await api.get("/nodes/active")).json()["count"] == 0
    await api.app.state.discovery.flush()  # the pending heartbeat must not revive it
    assert await db_pool.fetchval("SELECT state FROM far_nodes WHERE node_id = $1", node_id) == "offline"
    assert await db_pool.fetchval("SELECT count(*) FROM active_far_nodes") == 0
    r = await api.post("/nodes/heartbeat", headers=bearer(token))
    assert r.status_code == 401  # the token is revoked: register again
    r, _ = await register(api, ident)
    assert r.status_code == 200 and r.json()["node_id"] == node_id
    assert (await api.get("/nodes/active")).json()["count"] == 1


async def test_token_survives_redis_loss(api, identities):
    ident = identities[3]
    r, _ = await register(api, ident)
    token = r.json()["node_token"]
    hot = api.app.state.discovery.hot
    keys = [k async for k in hot.redis.scan_iter("fm:disc:tok:*")]
    await hot.redis.delete(*keys)
    r = await api.post("/nodes/heartbeat", headers=bearer(token))
    assert r.status_code == 200, r.text


async def _add_session(db_pool, node_id, peer_id, wallet, *, units, blocks, completion_tokens, finalize=True):
    async with db_pool.acquire() as conn:
        session_id = await conn.fetchval(
            """INSERT INTO far_mesh_sessions (request_id, model_id, price_per_token_far, price_per_prompt_token_far,
                                              platform_fee_bps)
               VALUES (gen_random_uuid()::text, $1, 0.0001, 0, 1000) RETURNING session_id""", MODEL_ID)
        await conn.execute(
            """INSERT INTO far_session_contributions (session_id, peer_id, node_id, wallet_address, blocks, work_units,
                                                      steps) VALUES ($1, $2, $3, $4, $5, $6, 1)""",
            session_id, peer_id, node_id, wallet, blocks, units)
        if finalize:
            await conn.execute("SELECT finalize_session($1, 'completed', 'length', 0, $2)", session_id,
                               completion_tokens)
    return session_id


async def test_ledger_in_heartbeat_and_provider_views(api, identities, db_pool):
    import uuid

    ident = identities[0]
    mixed_case = "0xABaBaBaBABabABabAbAbABAbABabababaBaBABaB"  # EIP-55 checksum of 0x + "ab" * 20
    r, _ = await register(api, ident, wallet=mixed_case)
    node_id, token = r.json()["node_id"], r.json()["node_token"]
    # 10 tokens through blocks 0:2 -> 20 units; only this node -> pool = 0.001 * 0.9
    session_a = await _add_session(db_pool, uuid.UUID(node_id), ident.peer_id, mixed_case, units=20, blocks="0:2",
                                   completion_tokens=10)
    await _add_session(db_pool, uuid.UUID(node_id), ident.peer_id, mixed_case, units=6, blocks="0:2",
                       completion_tokens=3, finalize=False)  # running: tokens count, money not yet
    # a confirmed payout of the first session
    batch = await db_pool.fetchval(
        """INSERT INTO far_payment_batches (network, state, cutoff, total_far, recipient_count, raw_tx, tx_hash, nonce,
                                            confirmed_at)
           VALUES ('local', 'confirmed', now(), 0.0009, 1, '\\x00', '0xfeed', 0, now()) RETURNING batch_id""")
    await db_pool.execute("INSERT INTO far_payment_batch_items VALUES ($1, $2, 0.0009, 900000000000000, 1)", batch,
                          mixed_case)
    await db_pool.execute("UPDATE far_session_contributions SET payment_batch_id = $1 WHERE session_id = $2", batch,
                          session_a)
    await _add_session(db_pool, uuid.UUID(node_id), ident.peer_id, mixed_case, units=10, blocks="0:2",
                       completion_tokens=5)  # finalized, unpaid: 0.00045 pending

    await api.post("/nodes/heartbeat", headers=bearer(token))
    discovery = api.app.state.discovery
    await discovery.refresh_ledgers()  # the flusher does this every 10 s
    r = await api.post("/nodes/heartbeat", headers=bearer(token))
    assert r.json()["tokens_served"] == 10 + 3 + 5 and r.json()["earned_far"] == "0.00135"

    view = (await api.get(f"/nodes/{node_id}")).json()
    assert (view["earned_far"], view["paid_far"], view["pending_far"]) == ("0.00135", "0.0009", "0.00045")
    assert view["last_payout"]["tx_hash"] == "0xfeed" and view["last_payout"]["amount_far"] == "0.0009"

    wallet = mixed_case.upper().replace("0X", "0x")  # lookups are case-insensitive
    stats = (await api.get(f"/provider/{wallet}/stats")).json()
    assert stats == {"wallet_address": mixed_case.lower(), "tokens_served": 18, "sessions": 2,
                     "earned_far": "0.00135", "paid_far": "0.0009", "pending_far": "0.00045", "nodes_online": 1,
                     "nodes_total": 1}
    earnings = (await api.get(f"/provider/{wallet}/earnings")).json()
    assert len(earnings["earnings"]) == 30 and earnings["total_far"] == "0.00135"
    assert earnings["earnings"][-1]["earned_far"] == "0.00135" and earnings["earnings"][0]["earned_far"] == "0"
    payments = (await api.get(f"/provider/{wallet}/payments")).json()["payments"]
    assert len(payments) == 1
    assert {k: payments[0][k] for k in ("amount_far", "tx_hash", "state", "network")} == {
        "amount_far": "0.0009", "tx_hash": "0xfeed", "state": "confirmed", "network": "local"}
    nodes = (await api.get(f"/provider/{wallet}/nodes")).json()
    assert nodes["count"] == 1 and nodes["nodes"][0]["earned_far"] == "0.00135"
    empty = (await api.get(f"/provider/0x{'1' * 40}/stats")).json()  # a wallet nobody registered
    assert empty["earned_far"] == "0" and empty["nodes_total"] == 0
    zero = await api.get(f"/provider/0x{'0' * 40}/stats")  # the one wallet rule: never a payable wallet
    assert zero.status_code == 422 and "zero address" in zero.json()["error"]["message"]


async def test_coverage_without_dht(api, identities):
    await register(api, identities[0])
    r = await api.get(f"/models/{MODEL_ID}/coverage")
    assert r.status_code == 200
    cov = r.json()
    assert cov["swarm_ready"] is False and cov["dht_connected"] is False
    assert cov["missing_blocks"] == [0, 1, 2, 3]
    assert cov["blocking"] == ["discovery cannot read the DHT: FAR_MESH_DHT_BOOTSTRAP is not set"]
    assert (await api.get("/models")).json()["models"][0] == {"model_id": MODEL_ID, "num_blocks": 4}


def test_status_when_discovery_is_unreachable():
    import io

    from rich.console import Console

    from services.discovery.status import run_status
    from tests.fixtures.swarm import free_port

    out = io.StringIO()
    code = run_status(url=f"http://127.0.0.1:{free_port()}", model_id=MODEL_ID, watch=False, interval=1,
                      console=Console(file=out, width=120, color_system=None))
    assert code == 1 and "is not reachable" in out.getvalue()


async def test_failed_flush_loses_nothing(api, identities, db_pool):
    ident = identities[1]
    r, _ = await register(api, ident)
    token, node_id = r.json()["node_token"], r.json()["node_id"]
    discovery = api.app.state.discovery
    await discovery.flush()
    await api.post("/nodes/heartbeat", json={"tokens_served": 77}, headers=bearer(token))
    real = discovery.store.flush_heartbeats

    async def broken(pending):
        raise ConnectionError("postgres went away")

    discovery.store.flush_heartbeats = broken
    try:
        with pytest.raises(ConnectionError):
            await discovery.flush()
    finally:
        discovery.store.flush_heartbeats = real
    assert await discovery.hot.redis.hexists("fm:disc:hb", node_id)
    await discovery.flush()
    assert await db_pool.fetchval("SELECT tokens_served FROM far_nodes WHERE node_id = $1", node_id) == 77


async def test_spot_check_record_disputes_and_quarantine_are_shown(api, identities, db_pool):
    """Issue 17: a provider sees its checks passed / failed, what was withheld and why, and its quarantine, on
    ``GET /provider/{wallet}/checks``, the node view and ``far-node status``."""
    import uuid

    import torch

    from node_server.cli import format_status
    from services.coordinator.checks import CheckStore, reason_of
    from services.coordinator.verification import (CheckJob, CheckResult, Verdict)

    honest, cheater = identities[1], identities[2]
    wallet = "0x" + "cd" * 20
    ids = {}
    for ident, name in ((honest, "honest"), (cheater, "cheater")):
        r, _ = await register(api, ident, wallet=wallet, name=name)
        ids[ident.peer_id] = r.json()["node_id"]
    session = await _add_session(db_pool, uuid.UUID(ids[cheater.peer_id]), cheater.peer_id, wallet, units=20,
                                 blocks="0:2", completion_tokens=10)
    store = CheckStore(db_pool)

    def result(peer, outcome, suspect):
        job = CheckJob(MODEL_ID, str(session), peer, 0, 2, torch.zeros(1, 5, 8), torch.zeros(1, 1, 8), "float32")
        verdict = Verdict(outcome, suspect, 0.3 if suspect else 1e-7, 0.3 if suspect else None,
                          1e-7 if suspect else None)
        return CheckResult(job, verdict, honest.peer_id, honest.peer_id if suspect else None, 1e-4, "float32")

    for _ in range(3):
        await store.record(result(honest.peer_id, "passed", None))
    failed = result(cheater.peer_id, "failed", "checked")
    await store.record(failed)
    await store.dispute(str(session), cheater.peer_id, "0:2", reason_of(failed))
    await store.quarantine(cheater.peer_id, "1 failed spot checks; last: " + reason_of(failed), 1)

    body = (await api.get(f"/provider/{wallet}/checks")).json()
    nodes = {n["peer_id"]: n for n in body["nodes"]}
    assert (nodes[honest.peer_id]["checks_passed"], nodes[honest.peer_id]["checks_failed"]) == (3, 0)
    # quarantine follows the wallet: the cheater's twin on the same wallet is quarantined too, but not disputed
    assert nodes[honest.peer_id]["quarantined"] and nodes[honest.peer_id]["disputed_far"] == "0"
    bad = nodes[cheater.peer_id]
    assert (bad["checks_passed"], bad["checks_failed"], bad["disputed_sessions"]) == (0, 1, 1)
    assert bad["disputed_far"] == "0.0009" == body["disputed_far"]  # 10 tokens x 0.0001, 90 % to providers
    assert bad["quarantined"] and "failed spot check" in bad["quarantine_reason"]
    assert body["recent_disputes"][0]["session_id"] == str(session)
    assert "spot check of blocks 0:2" in body["recent_disputes"][0]["reason"]
    stats = (await api.get(f"/provider/{wallet}/stats")).json()
    assert stats["earned_far"] == "0"  # the withheld payment is not earnings
    view = (await api.get(f"/nodes/{ids[cheater.peer_id]}")).json()
    assert view["quarantined"] and view["spot_checks"]["checks_failed"] == 1 and view["disputed_far"] == "0.0009"
    text = format_status(view, peer_id=cheater.peer_id)
    assert "0 passed, 1 failed" in text and "QUARANTINED" in text and "withheld" in text
    listed = (await api.get(f"/models/{MODEL_ID}/nodes")).json()["nodes"]
    assert {n["peer_id"]: n["quarantined"] for n in listed}[cheater.peer_id] is True

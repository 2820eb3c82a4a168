"""Discovery against a real swarm: a DHT bootstrap and Petals servers as subprocesses, discovery as a uvicorn
subprocess (real Postgres + Redis), and ``far-mesh status`` against it."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import httpx
import pytest
from rich.console import Console

from infra.processes import wait_until
from infra.swarm import ensure_identity
from services.common.identity import load_identity, registration_message
from services.discovery.status import run_status
from tests.fixtures.swarm import MODEL_ID, NUM_BLOCKS, start_discovery

pytestmark = pytest.mark.swarm

WALLET = "0x" + "12" * 20


def register(url: str, identity_path, span: tuple[int, int], name: str) -> dict:
    identity = load_identity(identity_path)
    nonce = httpx.get(f"{url}/nodes/challenge", params={"peer_id": identity.peer_id}).json()["nonce"]
    message = registration_message(nonce=nonce, peer_id=identity.peer_id, wallet_address=WALLET, model_id=MODEL_ID,
                                   start_block=span[0], end_block=span[1], public_name=name,
                                   hardware={"device": "cpu"})
    response = httpx.post(f"{url}/nodes/register", json={
        "peer_id": identity.peer_id, "wallet_address": WALLET, "model_id": MODEL_ID, "start_block": span[0],
        "end_block": span[1], "public_name": name, "hardware": {"device": "cpu"},
        "public_key": identity.public_key_b64, "signature": identity.sign(message), "nonce": nonce})
    assert response.status_code == 200, response.text
    return response.json()


def coverage(url: str) -> dict:
    response = httpx.get(f"{url}/models/{MODEL_ID}/coverage", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def wait_coverage(url: str, predicate, what: str, timeout: float = 60) -> dict:
    seen = {}

    def check():
        seen["last"] = coverage(url)
        return predicate(seen["last"])

    try:
        wait_until(check, timeout=timeout, interval=0.5, what=what)
    except TimeoutError as error:
        raise TimeoutError(f"{error}; last coverage: {seen.get('last')}") from None
    return seen["last"]


def status_cli(url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "status", "--url", url, "--model", MODEL_ID],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, COLUMNS="160"))


def status_in_process(url: str) -> tuple[int, str]:
    out = io.StringIO()
    code = run_status(url=url, model_id=MODEL_ID, watch=False, interval=1,
                      console=Console(file=out, width=160, color_system=None))
    return code, out.getvalue()


async def test_coverage_follows_the_swarm(fresh_swarm, tiny_model_dir, postgres_url, redis_url, clean_db, tmp_path):
    swarm = fresh_swarm
    process, url = start_discovery(workdir=tmp_path / "discovery", initial_peers=swarm.initial_peers,
                                   model_dir=tiny_model_dir, postgres_url=postgres_url, redis_url=redis_url)
    try:
        # A registered node whose server is not up yet: absent from the DHT.
        identity_a = swarm.workdir / "nodes" / "a.key"
        ensure_identity(identity_a)
        node_a = register(url, identity_a, (0, 2), "a")
        cov = coverage(url)
        assert cov["missing_blocks"] == [0, 1, 2, 3] and not cov["swarm_ready"]
        assert any("is registered for blocks 0-1 but absent from the DHT" in r for r in cov["blocking"]), cov

        # One of two spans: not ready, the exact missing blocks and the reason.
        # its real agent (far-node run) registers it again with the same identity and heartbeats
        swarm.start_node("a", "0:2", extra_args=("--wallet", WALLET, "--discovery-url", url))
        swarm.wait_online(["a"], NUM_BLOCKS)
        cov = wait_coverage(url, lambda c: c["loaded_blocks"] == 2, "blocks 0-1 loaded")
        assert (cov["expected_blocks"], cov["discovered_blocks"], cov["swarm_ready"]) == (4, 2, False)
        assert cov["missing_blocks"] == [2, 3] and cov["loading_blocks"] == []
        assert cov["blocking"] == ["blocks 2-3: no server announced"]
        assert cov["blocks"][0]["loaded"] == [swarm.nodes["a"].peer_id]
        code, text = status_in_process(url)
        assert code == 3
        assert "Expected Blocks: 4 | Discovered: 2/4 | Loaded: 2/4 | Swarm Ready: NO" in text
        assert "blocks 2-3: no server announced" in text and "Missing blocks: 2-3" in text
        result = status_cli(url)
        assert result.returncode == 3, result.stdout + result.stderr
        assert "Swarm Ready: NO" in result.stdout and "blocks 2-3: no server announced" in result.stdout

        # The second span (--no-register: not registered with discovery): ready, and the unregistered peer is named.
        swarm.start_node("b", "2:4", extra_args=("--no-register",))
        swarm.wait_online(["b"], NUM_BLOCKS)
        cov = wait_coverage(url, lambda c: c["swarm_ready"], "swarm ready")
        assert (cov["discovered_blocks"], cov["loaded_blocks"], cov["missing_blocks"]) == (4, 4, [])
        peer_b = swarm.nodes["b"].peer_id
        registered = {n["peer_id"] for n in httpx.get(f"{url}/models/{MODEL_ID}/nodes").json()["nodes"]}
        if peer_b not in registered:
            assert cov["blocking"] == [f'peer "b" ({peer_b}) serves blocks 2-3 but is not registered: '
                                       "it earns nothing"]
        result = status_cli(url)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Expected Blocks: 4 | Discovered: 4/4 | Loaded: 4/4 | Swarm Ready: YES" in result.stdout

        metrics = httpx.get(f"{url}/metrics").text
        assert f'far_discovery_swarm_ready{{model_id="{MODEL_ID}"}} 1.0' in metrics
        assert f'far_discovery_model_loaded_blocks{{model_id="{MODEL_ID}"}} 4.0' in metrics

        # Stop b (graceful: it announces OFFLINE): not ready again, with the reason.
        swarm.nodes["b"].process.stop()
        cov = wait_coverage(url, lambda c: not c["swarm_ready"], "not ready after b stopped", timeout=30)
        assert cov["missing_blocks"] == [2, 3]
        assert "blocks 2-3: no server announced" in cov["blocking"]
        code, text = status_in_process(url)
        assert code == 3 and "Swarm Ready: NO" in text

        # a's node is still registered and active
        active = httpx.get(f"{url}/nodes/active").json()
        assert [n["node_id"] for n in active["nodes"]] == [node_a["node_id"]]
    finally:
        process.stop()
    assert "Traceback" not in (tmp_path / "discovery" / "discovery.log").read_text()

"""A provider behind NAT serves through a circuit relay, with no flag (infra/wanlab.py, services/common/p2p_relay.py).

The WAN lab: the bootstrap, discovery, the coordinator and a public provider (blocks 0:2, ``--public-address``)
each on a host of the lab's internet; a second provider sits on a home LAN behind a MASQUERADE router (blocks
2:4, which nobody else holds) and is started like a home user would: ``--host 0.0.0.0 --port 31330``, no public
address, no relay flag. Nobody can dial it. It must find that out (Petals asks the bootstrap to dial it), reserve
a slot on the bootstrap's relay (AutoNAT: private), and then:

- discovery reaches it through the relay and says so (``via_relay`` = the bootstrap), as do ``far-node status``
  and ``far-mesh status``; the public provider is reached directly;
- a greedy generation through the coordinator (route 0:2 public, 2:4 home) completes with the local model's
  text, and the home provider's contribution is recorded with its node and wallet.

Skips with the reason where the lab cannot be made (not root, missing iptables/ethtool).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest

from infra.processes import ManagedProcess, python_argv, wait_until
from infra.swarm import LocalSwarm
from infra.wanlab import WanLab, unavailable_reason
from tests.fixtures.swarm import (MODEL_ID, asse_events, create_api_key, local_greedy, start_coordinator,
                                  start_discovery)
from tests.test_multihost import _via

pytestmark = pytest.mark.swarm

PROMPT = "def compute(a, b):"
MAX_TOKENS = 24
NODE_PORT, DHT_PORT, HTTP_PORT = 31330, 31337, 8000
WALLETS = {"public": "0x" + "A1" * 20, "home": "0x" + "B2" * 20}


@pytest.fixture
def lab():
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"the NAT test needs the WAN lab: {reason}")
    with WanLab() as made:
        yield made


def _expected_text(tiny_model_dir, local_model) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt_ids = list(tokenizer(PROMPT).input_ids)
    return tokenizer.decode(local_greedy(local_model, prompt_ids, MAX_TOKENS), skip_special_tokens=True)


def test_provider_behind_nat_serves_through_the_bootstrap_relay(lab, tiny_model_dir, local_model, make_database,
                                                                 redis_url, tmp_path):
    started = time.monotonic()

    def phase(what: str) -> None:
        print(f"[wan-nat] {time.monotonic() - started:6.1f} s  {what}", flush=True)

    postgres_url = make_database()
    hosts = {name: lab.add_host(name) for name in ("dht", "discovery", "coordinator", "public")}
    home = lab.add_home("router")
    hosts["home"] = lab.add_home_host(home, "home")
    pg, rd = urlsplit(postgres_url), urlsplit(redis_url)
    lab.relay_to_root({pg.port or 5432: (pg.hostname, pg.port or 5432), rd.port or 6379: (rd.hostname, rd.port or 6379)})
    db_url, cache_url = _via(postgres_url, lab.gateway), _via(redis_url, lab.gateway)
    processes: list[ManagedProcess] = []
    swarm = LocalSwarm(tiny_model_dir, MODEL_ID, tmp_path / "swarm", request_timeout=10)
    try:
        dht = hosts["dht"]
        peers = swarm.start_bootstrap(extra_args=("--host", "0.0.0.0", "--port", str(DHT_PORT),
                                                  "--announce-maddrs", dht.address),
                                      argv_prefix=tuple(dht.argv([])))
        relay_id = peers[0].rsplit("/p2p/", 1)[1]
        disc = hosts["discovery"]
        discovery, discovery_url = start_discovery(
            workdir=tmp_path / "discovery", initial_peers=peers, postgres_url=db_url, redis_url=cache_url,
            model_dir=tiny_model_dir, host=disc.address, port=HTTP_PORT, argv_prefix=tuple(disc.argv([])),
            env_extra={"DISCOVERY_REACHABILITY_INTERVAL_S": "2", "LOG_LEVEL": "INFO"})
        processes.append(discovery)
        swarm.start_node("public", "0:2", discovery_url=discovery_url, wallet=WALLETS["public"],
                         argv_prefix=tuple(hosts["public"].argv([])),
                         extra_args=("--host", "0.0.0.0", "--port", str(NODE_PORT),
                                     "--public-address", hosts["public"].address, "--heartbeat-interval", "2"))
        # the home user's command line: no public address (it has none), no relay flag
        home_node = swarm.start_node("home", "2:4", discovery_url=discovery_url, wallet=WALLETS["home"],
                                     argv_prefix=tuple(hosts["home"].argv([])),
                                     extra_args=("--host", "0.0.0.0", "--port", str(NODE_PORT),
                                                 "--heartbeat-interval", "2"))
        _, api_key = asyncio.run(create_api_key(postgres_url))
        coord = hosts["coordinator"]
        coordinator = start_coordinator(
            workdir=tmp_path / "coordinator", model_dir=tiny_model_dir, initial_peers=peers, postgres_url=db_url,
            redis_url=cache_url, api_key=api_key, host=coord.address, port=HTTP_PORT,
            argv_prefix=tuple(coord.argv([])),
            env_extra={"PETALS_REQUEST_TIMEOUT_S": "10", "SWARM_READINESS_REFRESH_S": "0.5",
                       "DISCOVERY_URL": discovery_url})
        processes.append(coordinator.process)
        phase("lab, bootstrap, discovery, providers and coordinator started")

        # --- discovery reaches the home provider through the bootstrap's relay, the public one directly ---------
        def reached():
            cov = httpx.get(f"{discovery_url}/models/{MODEL_ID}/coverage", timeout=5).json()
            nodes = httpx.get(f"{discovery_url}/models/{MODEL_ID}/nodes", timeout=5).json()["nodes"]
            reach = {n["peer_id"]: (n.get("reachability") or {}) for n in nodes}
            home_reach = reach.get(home_node.peer_id, {})
            return (cov["swarm_ready"] and reach.get(swarm.nodes["public"].peer_id, {}).get("reachable")
                    and home_reach.get("via_relay") and (cov, reach))

        cov, reach = wait_until(reached, timeout=300, interval=1.0, what="the home provider reachable via relay",
                                process=home_node.process)
        assert reach[home_node.peer_id]["via_relay"] == relay_id, reach[home_node.peer_id]
        assert reach[swarm.nodes["public"].peer_id]["via_relay"] is None
        assert [p["peer_id"] for p in cov["relayed"]] == [home_node.peer_id] and not cov["unreachable"], cov
        phase(f"the home provider is reachable via relay {relay_id[-8:]}")

        status = subprocess.run(python_argv("node_server.cli", "status", "--identity", str(home_node.identity),
                                            "--discovery-url", discovery_url),
                                env=dict(os.environ, FAR_MESH_STATE_DIR=str(tmp_path / "swarm" / "nodes" /
                                                                            "home-state")),
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert f"reachable    via relay {relay_id}" in status.stdout, status.stdout
        shown = subprocess.run(python_argv("services.cli", "status", "--url", discovery_url, "--model", MODEL_ID),
                               capture_output=True, text=True, timeout=60)
        from services.discovery.status import _peer

        assert f"reachable: via relay {_peer(relay_id, {})}" in shown.stdout, shown.stdout

        # --- a greedy generation through both providers: the local model's text --------------------------------
        request_id = "wan_nat_001"
        events, route = [], None

        async def generate():
            nonlocal route
            async with httpx.AsyncClient(base_url=coordinator.url, headers=coordinator.headers,
                                         timeout=60) as client:
                deadline = time.monotonic() + 60
                while not (await client.get("/v1/models")).json()["data"][0]["ready"]:
                    assert time.monotonic() < deadline, "the coordinator never saw the swarm ready"
                    await asyncio.sleep(0.3)
                async with client.stream("POST", "/mesh/inference/generate", json={
                        "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
                        "request_id": request_id}) as response:
                    assert response.status_code == 200, await response.aread()
                    async for event in asse_events(response):
                        events.append(event["data"])
                        if route is None and not event["data"].get("done"):
                            route = (await client.get(f"/mesh/inference/{request_id}")).json()["route"]

        asyncio.run(generate())
        final = events[-1]
        assert final.get("done") and final["finish_reason"] == "length", final
        assert final["text"] == _expected_text(tiny_model_dir, local_model)
        assert [hop["peer_id"] for hop in route] == [swarm.nodes["public"].peer_id, home_node.peer_id], route
        phase("generation through the relayed provider equals the local model")

        # --- its contribution is recorded with its node and wallet --------------------------------------------
        rows = asyncio.run(_contributions(postgres_url, request_id))
        for name in ("public", "home"):
            row = rows[swarm.nodes[name].peer_id]
            assert row["steps"] == MAX_TOKENS and row["node_id"] is not None, dict(row)
            assert row["wallet_address"].lower() == WALLETS[name].lower()
            assert row["payment_far"] > 0
        phase("contributions recorded")
    finally:
        swarm.stop()
        with ThreadPoolExecutor(max_workers=max(1, len(processes))) as pool:
            list(pool.map(lambda process: process.stop(), processes))
        phase("stopped")


async def _contributions(postgres_url: str, request_id: str) -> dict:
    import asyncpg

    conn = await asyncpg.connect(postgres_url)
    try:
        session = await conn.fetchrow("SELECT session_id FROM far_mesh_sessions WHERE request_id = $1", request_id)
        rows = await conn.fetch("SELECT * FROM far_session_contributions WHERE session_id = $1", session["session_id"])
        return {r["peer_id"]: r for r in rows}
    finally:
        await conn.close()

"""The mesh across hosts (issue 18): every part on a host of its own, addresses set as an operator would.

Each "host" is a Linux network namespace on a bridge with its own 10.x address (infra/netns.py), made here and
removed afterwards. Nothing reaches another part through 127.0.0.1: the DHT bootstrap listens on 0.0.0.0 and
announces its host's address (``far-mesh dht --announce-maddrs``); providers listen on 0.0.0.0:31330 and
announce theirs (``far-node run --public-address``); discovery, coordinator and payouts listen on their host's
address. The root namespace (the bridge's ``.1``) plays the database server: PostgreSQL and Redis listen on its
loopback, so a relay forwards the bridge address's ports to them.

A generation streams through the coordinator host, contributions are recorded for the registered providers, the
link of the provider host on the route is cut mid-stream (``ip link set ... down``) and the stream fails over to
its replica; the payment tracker pays the providers on its host's local chain. A provider that announces an
address nobody can dial is then reported unreachable by discovery, in its own log and by ``far-node status``.

Run alone: ``make multihost``. Skips with the reason where namespaces cannot be made (not root, no iproute2).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from infra.netns import NetnsLab, unavailable_reason
from infra.processes import ManagedProcess, python_argv, wait_until
from infra.swarm import LocalSwarm
from tests.fixtures.swarm import (MODEL_ID, NUM_BLOCKS, asse_events, create_api_key, start_coordinator,
                                  start_discovery)

pytestmark = pytest.mark.swarm

PROMPT = "def compute(a, b):"
MAX_TOKENS = 40
CUT_AFTER = 8  # tokens received before the provider host's link is cut
NODE_PORT, DHT_PORT, HTTP_PORT, PAYOUTS_PORT = 31330, 31337, 8000, 8300
WALLETS = {"p1": "0x" + "A1" * 20, "p2": "0x" + "B2" * 20, "p3": "0x" + "C3" * 20, "lost": "0x" + "D4" * 20}
SPANS = {"p1": "0:2", "p2": "2:4", "p3": "2:4"}


def _via(url: str, host: str) -> str:
    """The same server URL with another host (the relay on the bridge address)."""
    parts = urlsplit(url)
    netloc = parts.netloc.replace(parts.hostname, host, 1)
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
def lab():
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"multi-host test needs network namespaces: {reason}")
    with NetnsLab() as made:
        yield made


def _started(stack: list, process: ManagedProcess) -> ManagedProcess:
    stack.append(process)
    return process


def test_mesh_across_hosts(lab, tiny_model_dir, make_database, redis_url, tmp_path):
    started = time.monotonic()

    def phase(what: str) -> None:  # real timings (-s)
        print(f"[multihost] {time.monotonic() - started:6.1f} s  {what}", flush=True)

    postgres_url = make_database()
    hosts = {name: lab.add_host(name) for name in ("dht", "discovery", "coordinator", "payouts", *SPANS, "lost")}
    pg, rd = urlsplit(postgres_url), urlsplit(redis_url)
    # the database server's ports on the bridge address (they listen on loopback only here)
    lab.relay_to_root({pg.port or 5432: (pg.hostname, pg.port or 5432),
                       rd.port or 6379: (rd.hostname, rd.port or 6379)})
    db_url, cache_url = _via(postgres_url, lab.gateway), _via(redis_url, lab.gateway)
    processes: list[ManagedProcess] = []
    swarm = LocalSwarm(tiny_model_dir, MODEL_ID, tmp_path / "swarm", request_timeout=10)
    try:
        # --- the bootstrap: listens on every interface, tells peers to dial its host's address -------------
        dht = hosts["dht"]
        peers = swarm.start_bootstrap(extra_args=("--host", "0.0.0.0", "--port", str(DHT_PORT),
                                                  "--announce-maddrs", dht.address),
                                      argv_prefix=tuple(dht.argv([])))
        assert peers and all(p.startswith(f"/ip4/{dht.address}/tcp/{DHT_PORT}/p2p/") for p in peers), peers
        phase(f"{len(hosts)} hosts and the bootstrap up: {peers[0]}")

        # --- discovery and the coordinator, each on its host's address ----------------------------------
        disc = hosts["discovery"]
        discovery, discovery_url = start_discovery(
            workdir=tmp_path / "discovery", initial_peers=peers, postgres_url=db_url, redis_url=cache_url,
            model_dir=tiny_model_dir, host=disc.address, port=HTTP_PORT, argv_prefix=tuple(disc.argv([])),
            env_extra={"DISCOVERY_REACHABILITY_INTERVAL_S": "2", "LOG_LEVEL": "INFO"})
        processes.append(discovery)
        for name, span in SPANS.items():
            host = hosts[name]
            swarm.start_node(name, span, discovery_url=discovery_url, wallet=WALLETS[name],
                             argv_prefix=tuple(host.argv([])),
                             extra_args=("--host", "0.0.0.0", "--port", str(NODE_PORT),
                                         "--public-address", host.address, "--heartbeat-interval", "2"))
        _, api_key = asyncio.run(create_api_key(postgres_url))
        coord = hosts["coordinator"]
        coordinator = start_coordinator(
            workdir=tmp_path / "coordinator", model_dir=tiny_model_dir, initial_peers=peers, postgres_url=db_url,
            redis_url=cache_url, api_key=api_key, host=coord.address, port=HTTP_PORT,
            argv_prefix=tuple(coord.argv([])),
            env_extra={"PETALS_REQUEST_TIMEOUT_S": "10", "SWARM_READINESS_REFRESH_S": "0.5",
                       "DISCOVERY_URL": discovery_url})
        processes.append(coordinator.process)

        # --- payouts on their own host (while the providers load): its local chain, the database via the bridge --
        pay = hosts["payouts"]
        chain = _started(processes, ManagedProcess(
            "chain", pay.argv(python_argv("services.cli", "chain", "devnode", "--port", "8545")),
            log_path=tmp_path / "chain.log").start())
        rpc = "http://127.0.0.1:8545"  # the chain node runs on the payouts host itself
        chain_env = dict(os.environ, BSC_NETWORK="local", BSC_RPC_URL=rpc, POSTGRES_URL=db_url, REDIS_URL=cache_url,
                         FAR_MESH_STATE_DIR=str(tmp_path / "payouts"), MIN_PAYOUT_FAR="0.000001",
                         PAYOUT_CONFIRMATIONS="1")
        deployed = None

        def deploy():
            nonlocal deployed
            deployed = subprocess.run(pay.argv(python_argv("services.cli", "chain", "deploy", "--network", "local")),
                                      env=chain_env, capture_output=True, text=True, timeout=120)
            return deployed.returncode == 0

        wait_until(deploy, timeout=90, interval=2, what="far-mesh chain deploy on the payouts host", process=chain)
        from infra.mesh import ADDRESS_LINE

        chain_env.update(dict(ADDRESS_LINE.findall(deployed.stdout)))
        payouts = _started(processes, ManagedProcess(
            "payouts", pay.argv(python_argv("services.cli", "payouts", "serve", "--host", pay.address, "--port",
                                            str(PAYOUTS_PORT), "--network", "local")),
            env=chain_env, log_path=tmp_path / "payouts.log").start())
        wait_until(lambda: _ok(f"http://{pay.address}:{PAYOUTS_PORT}/readyz"), timeout=90,
                   what="the payment tracker /readyz", process=payouts)
        phase("coordinator and payment tracker up")

        # --- ready: discovery sees every block ONLINE, every provider registered and reachable -------------
        def mesh_ready():
            cov = httpx.get(f"{discovery_url}/models/{MODEL_ID}/coverage", timeout=5).json()
            nodes = httpx.get(f"{discovery_url}/models/{MODEL_ID}/nodes", timeout=5).json()["nodes"]
            reach = {n["peer_id"]: (n.get("reachability") or {}) for n in nodes}
            ours = {swarm.nodes[name].peer_id for name in SPANS}
            return cov["swarm_ready"] and all(reach.get(p, {}).get("reachable") for p in ours) and reach

        reach = wait_until(mesh_ready, timeout=240, interval=1.0, what="swarm ready, providers reachable")
        for name in SPANS:  # discovery dialed each provider at the address it announced, on its port
            assert reach[swarm.nodes[name].peer_id]["addresses"] == [f"/ip4/{hosts[name].address}/tcp/{NODE_PORT}"]
        phase("swarm ready, every provider registered and reachable at its announced address")

        # --- a generation streams from the coordinator host; the route's 2:4 host loses its link ------------
        request_id = "multihost_001"
        tokens, events, victim = [], [], None

        async def generate():
            nonlocal victim
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
                        if event["data"].get("done"):
                            continue
                        tokens.append(event["data"]["token"])
                        if len(tokens) == CUT_AFTER:
                            route = (await client.get(f"/mesh/inference/{request_id}")).json()["route"]
                            on_route = {hop["peer_id"] for hop in route}
                            victim = next(n for n in ("p2", "p3") if swarm.nodes[n].peer_id in on_route)
                            lab.cut(hosts[victim])

        asyncio.run(generate())
        final = events[-1]
        assert victim is not None and final.get("done"), final
        assert final["finish_reason"] == "length" and len(tokens) == MAX_TOKENS
        assert "".join(tokens) == final["text"]
        survivor = "p3" if victim == "p2" else "p2"
        [replaced] = final["replaced_servers"]
        assert replaced["peer_id"] == swarm.nodes[victim].peer_id and replaced["blocks"] == "2:4"
        assert replaced["replaced_by"] == swarm.nodes[survivor].peer_id
        swarm.nodes[victim].process.kill()  # its host is cut off: nothing to shut down gracefully
        phase(f"generation done: {victim}'s link cut after {CUT_AFTER} tokens, replaced by {survivor} "
              f"({replaced['cause']}, stall {replaced['stall_ms']} ms)")

        # --- contributions: every registered provider that served is recorded with its wallet ---------------
        async def contributions():
            import asyncpg

            conn = await asyncpg.connect(postgres_url)
            try:
                session = await conn.fetchrow("SELECT * FROM far_mesh_sessions WHERE request_id = $1", request_id)
                rows = await conn.fetch("SELECT * FROM far_session_contributions WHERE session_id = $1",
                                        session["session_id"])
                return session, {r["peer_id"]: r for r in rows}
            finally:
                await conn.close()

        # --- a provider announcing an address nobody can dial (it loads while payouts run; checked below) ------
        lost = swarm.start_node("lost", "0:2", discovery_url=discovery_url, wallet=WALLETS["lost"],
                                argv_prefix=tuple(hosts["lost"].argv([])),
                                extra_args=("--host", "0.0.0.0", "--port", str(NODE_PORT),
                                            # a typo'd public address: the database server's, where 31330 is shut
                                            "--public-address", lab.gateway, "--heartbeat-interval", "2"))

        session, rows = asyncio.run(contributions())
        by_name = {name: rows.get(node.peer_id) for name, node in swarm.nodes.items()}
        assert by_name["p1"]["steps"] == MAX_TOKENS
        assert CUT_AFTER - 1 <= by_name[victim]["steps"] < MAX_TOKENS
        assert by_name[survivor]["steps"] == MAX_TOKENS - by_name[victim]["steps"]
        for name in SPANS:
            assert by_name[name]["node_id"] is not None
            assert by_name[name]["wallet_address"].lower() == WALLETS[name].lower()
        assert session["fee_far"] + sum(r["payment_far"] for r in rows.values()) == session["cost_far"] > 0

        paid = subprocess.run(pay.argv(python_argv("services.cli", "payouts", "run-once", "--network", "local")),
                              env=chain_env, capture_output=True, text=True, timeout=180)
        assert paid.returncode == 0, paid.stdout + paid.stderr
        batches, items = asyncio.run(_payments(postgres_url))
        assert [b["state"] for b in batches] == ["confirmed"], batches
        assert set(items) == {WALLETS[name].lower() for name in SPANS}
        phase("contributions recorded, providers paid")

        # --- ... discovery, its log and far-node status say it is unreachable ---------------------------------
        def lost_verdict():
            try:
                info = httpx.get(f"{discovery_url}/nodes/by-peer/{lost.peer_id}", timeout=5).json()
            except (httpx.HTTPError, ValueError):
                return None
            reach = info.get("reachability") or {}
            return reach if reach.get("reachable") is False and "CANNOT reach" in lost.process.tail(200) else None

        verdict = wait_until(lost_verdict, timeout=180, interval=1.0, what="discovery and the node to report it "
                                                                          "unreachable", process=lost.process)
        assert verdict["error"] and "--public-address" in verdict["hint"]
        status = subprocess.run(python_argv("node_server.cli", "status", "--identity", str(lost.identity),
                                            "--discovery-url", discovery_url),
                                env=dict(os.environ, FAR_MESH_STATE_DIR=str(tmp_path / "swarm" / "nodes" /
                                                                            "lost-state")),
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert "reachable    NO:" in status.stdout, status.stdout
        coverage = httpx.get(f"{discovery_url}/models/{MODEL_ID}/coverage", timeout=5).json()
        assert lost.peer_id in {peer["peer_id"] for peer in coverage["unreachable"]}, coverage["unreachable"]
        shown = subprocess.run(python_argv("services.cli", "status", "--url", discovery_url, "--model", MODEL_ID),
                               capture_output=True, text=True, timeout=60)
        assert "Unreachable: lost" in shown.stdout, shown.stdout
        metrics = httpx.get(f"{discovery_url}/metrics", timeout=5).text
        gauge = re.search(rf'^far_discovery_unreachable_peers{{model_id="{MODEL_ID}"}} (\S+)$', metrics, re.M)
        assert gauge and float(gauge.group(1)) >= 1, metrics  # the lost node (and the cut one while announced)
        phase("the unreachable provider is reported by discovery, its log and far-node status")
    finally:
        phase("stopping")
        swarm.stop()  # providers first: they unregister from discovery as they stop
        phase("providers and bootstrap stopped")
        with ThreadPoolExecutor(max_workers=max(1, len(processes))) as pool:  # independent: all at once
            list(pool.map(lambda process: process.stop(), processes))
        phase("services stopped")


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


async def _payments(postgres_url: str):
    import asyncpg

    conn = await asyncpg.connect(postgres_url)
    try:
        batches = await conn.fetch("SELECT batch_id, state, error FROM far_payment_batches")
        items = {r["wallet_address"].lower(): r["amount_far"] for r in await conn.fetch(
            "SELECT wallet_address, amount_far FROM far_payment_batch_items")}
        return [dict(b) for b in batches], {w: Decimal(a) for w, a in items.items() if a > 0}
    finally:
        await conn.close()

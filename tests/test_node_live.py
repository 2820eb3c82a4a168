"""``far-node start`` + ``far-node run`` against a live discovery service (uvicorn subprocess, real Postgres and
Redis) and a live DHT bootstrap, with a real Petals server: the node picks the least covered blocks, registers
with a proof of its peer ID, shows up active with its blocks and hardware, heartbeats move ``last_seen``, and
after SIGTERM it is offline (in discovery and in the DHT) with no process of its tree left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import datetime

import httpx
import psutil
import pytest

from infra.processes import ManagedProcess, wait_until
from node_server.discovery_client import DiscoveryClient, NotRegistered
from services.common.identity import NodeIdentity
from tests.fixtures.swarm import MODEL_ID, NUM_BLOCKS, free_port, start_discovery

pytestmark = pytest.mark.swarm

WALLET = "0x52908400098527886E0F7030069857D2E4169EE7"


def test_node_registers_heartbeats_and_stops_cleanly(fresh_swarm, tiny_model_dir, make_database, redis_url,
                                                     tmp_path):
    postgres_url = make_database()  # a registry of our own: nodes of other tests stay out of /nodes/active
    swarm = fresh_swarm
    swarm.start_node("a", "0:2")  # an unregistered server on blocks 0:2: ours should pick 2:4
    discovery, url = start_discovery(workdir=tmp_path / "discovery", initial_peers=swarm.initial_peers,
                                     model_dir=tiny_model_dir, postgres_url=postgres_url, redis_url=redis_url)
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg"), FAR_MESH_STATE_DIR=str(tmp_path / "state"),
               FAR_MESH_DHT_BOOTSTRAP=",".join(swarm.initial_peers), FAR_NODE_NO_TORCH_PROBE="1")
    node = None
    try:
        setup = subprocess.run(
            [sys.executable, "-m", "node_server.cli", "start", "--yes", "--wallet", WALLET.lower(), "--model",
             str(tiny_model_dir), "--model-id", MODEL_ID, "--blocks", "auto", "--num-blocks", "2",
             "--public-address", "127.0.0.1", "--port", str(free_port()), "--discovery-url", url,
             "--public-name", "live"], env=env, capture_output=True, text=True, timeout=60)
        assert setup.returncode == 0, setup.stderr
        peer_id = setup.stdout.split("peer ID ")[1].split()[0]

        swarm.wait_online(["a"], NUM_BLOCKS)
        node = ManagedProcess("far-node", [sys.executable, "-m", "node_server.cli", "run", "--heartbeat-interval",
                                           "1", "--update-period", "5"],
                              env=env, log_path=tmp_path / "far-node.log").start()

        def view() -> dict:
            response = httpx.get(f"{url}/nodes/by-peer/{peer_id}", timeout=5)
            return response.json() if response.status_code == 200 else {}

        wait_until(lambda: view().get("active"), timeout=120, interval=0.5, what="the node active in discovery",
                   process=node)
        first = view()
        assert (first["start_block"], first["end_block"]) == (2, 4), "auto span: the least covered blocks"
        assert first["wallet_address"].lower() == WALLET.lower() and first["model_id"] == MODEL_ID
        assert first["state"] == "online" and first["public_name"] == "live"
        assert first["hardware"]["device"] == "cpu" and first["hardware"]["ram_total_gb"] > 0
        active = httpx.get(f"{url}/nodes/active").json()["nodes"]
        assert [n["peer_id"] for n in active] == [peer_id]
        # it registered the span it announces (JOINING, then ONLINE once its blocks are loaded)
        online = wait_until(lambda: (lambda o: o if all(peer_id in o[b] for b in (2, 3)) else None)(
            swarm.online_peers(NUM_BLOCKS)), timeout=60, interval=0.5, what="the node ONLINE in the DHT", process=node)
        assert all(peer_id not in online[b] for b in (0, 1))

        # heartbeats move last_seen
        seen = datetime.fromisoformat(first["last_seen"])
        wait_until(lambda: datetime.fromisoformat(view()["last_seen"]) > seen, timeout=15, interval=0.5,
                   what="last_seen to move", process=node)
        wait_until(lambda: "Blocks 2:4 ONLINE" in node.tail(400), timeout=15, what="the status line", process=node)
        assert "[Heartbeat] Tokens: 0 | Earned: 0.0000 FAR | RAM: " in node.tail(400)

        status = subprocess.run([sys.executable, "-m", "node_server.cli", "status"], env=env, capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert "state        online (active)" in status.stdout and "blocks 2:4" in status.stdout, status.stdout

        # SIGTERM: the server announces OFFLINE, the node unregisters, nothing of its tree remains
        tree = node.tree()
        assert any(p.name() == "p2pd" for p in tree), [p.name() for p in tree]
        node.popen.send_signal(signal.SIGTERM)
        assert node.popen.wait(timeout=60) == 0, node.tail()
        _, alive = psutil.wait_procs(tree, timeout=5)
        assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
        after = view()
        assert after["state"] == "offline" and not after["active"]
        assert httpx.get(f"{url}/nodes/active").json()["nodes"] == []
        wait_until(lambda: all(peer_id not in peers for peers in swarm.online_peers(NUM_BLOCKS)), timeout=10,
                   interval=0.5, what="the node no longer ONLINE in the DHT")
        log = node.tail(400)
        assert "unregistered from discovery" in log and "Traceback" not in log

        # the identity is reused: a proof by this key for another peer ID is refused
        from node_server import keys

        ours = keys.load_identity(tmp_path / "state" / "node" / "identity.key")
        assert ours.peer_id == peer_id
        other = keys.load_identity(swarm.nodes["a"].identity)
        impostor = NodeIdentity(ours.path, other.peer_id, ours.public_key, ours._private_key)
        client = DiscoveryClient(url)
        with pytest.raises(NotRegistered, match="invalid_signature"):
            client.register(impostor, wallet_address=WALLET, model_id=MODEL_ID, start_block=0, end_block=2,
                            public_name="impostor", hardware={"device": "cpu"})
        client.close()
    finally:
        if node is not None:
            node.stop()
        discovery.stop()
    assert "Traceback" not in (tmp_path / "discovery" / "discovery.log").read_text()

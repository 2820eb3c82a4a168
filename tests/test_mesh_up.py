"""``far-mesh up`` as a user runs it, in a terminal (pexpect): the whole local mesh from the real parts comes up,
prints where everything is and a ready API key, answers the README's curl example, stops every process it
started on Ctrl-C, and a second ``up`` reuses the state (API key, contracts, database) instead of starting over."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pexpect
import psutil
import pytest

from tests.fixtures.swarm import free_port

pytestmark = pytest.mark.swarm


def read_env(path: Path) -> dict:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def spawn_up(state_dir: Path, server_url: str, redis_url: str, database: str, log) -> pexpect.spawn:
    env = dict(os.environ, FAR_MESH_STATE_DIR=str(state_dir), POSTGRES_URL=server_url, REDIS_URL=redis_url,
               DISCOVERY_CHALLENGES_PER_MINUTE="100000",  # the test session shares one Redis database
               COLUMNS="250")
    args = ["-m", "services.cli", "up", "--database", database]
    for option in ("--port", "--discovery-port", "--chain-port", "--payouts-port"):
        args += [option, str(free_port())]
    return pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", timeout=420, dimensions=(60, 250),
                         logfile=log)


def ctrl_c(child: pexpect.spawn) -> list[psutil.Process]:
    """Ctrl-C in the terminal; returns the processes `up` had started (all must be gone afterwards)."""
    tree = psutil.Process(child.pid).children(recursive=True)
    assert tree
    child.sendintr()
    child.expect(r"stopped \(state kept in", timeout=120)
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    return tree


def test_far_mesh_up_runs_talks_stops_and_reuses(smollm2_dir, postgres_server_url, redis_url, tmp_path):
    from services.models.catalog import SMOLLM2

    state_dir = tmp_path / "state"
    (state_dir / "models").mkdir(parents=True)
    (state_dir / "models" / SMOLLM2.name).symlink_to(smollm2_dir)  # the model cache, not a second 0.5 GB build
    database = f"farmesh_up_{secrets.token_hex(4)}"
    log = open(tmp_path / "up.log", "w")
    try:
        child = spawn_up(state_dir, postgres_server_url, redis_url, database, log)
        child.expect("starting the discovery service")
        child.expect("starting 3 provider nodes")
        child.expect(r"blocks loaded \d+/30")  # progress while the nodes load
        child.expect("Far Mesh is up")
        child.expect("Ctrl-C stops everything")
        out = child.before
        env = read_env(state_dir / "mesh" / "mesh.env")
        key, url = env["FAR_MESH_API_KEY"], env["FAR_MESH_URL"]
        assert key.startswith("fl_") and key in out
        for what in ("OpenAI base URL", "provider dashboard", "swarm page", "coordinator metrics",
                     "payment tracker metrics", f"{url}/v1"):
            assert what in out

        # the README's curl example, verbatim but for the key and URL (no Content-Type header)
        result = subprocess.run(["curl", "-sS", "-N", "-H", f"Authorization: Bearer {key}", "-d",
                                 '{"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}',
                                 f"{url}/mesh/inference/generate"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and '"done": true' in result.stdout, result.stdout + result.stderr
        assert '"node_id": null' not in result.stdout  # every node registered through discovery

        tree = ctrl_c(child)
        assert child.exitstatus == 0
        gone, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, f"left running: {[(p.pid, p.cmdline()) for p in alive]}"

        # a second `up`: the same key and contracts, the existing database; Ctrl-C while the nodes load
        child = spawn_up(state_dir, postgres_server_url, redis_url, database, log)
        child.expect("existing database")
        child.expect(r"\(kept from the last run\)")  # the contracts, on the chain state anvil saved
        child.expect(rf"API key {key[:10]}… \(kept from the last run\)")
        child.expect("waiting for the swarm")
        assert read_env(state_dir / "mesh" / "mesh.env")["FAR_MESH_API_KEY"] == key
        tree = ctrl_c(child)
        gone, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, f"left running: {[(p.pid, p.cmdline()) for p in alive]}"
    finally:
        log.close()
        from database.migrate import drop_database

        drop_database(postgres_server_url, database)

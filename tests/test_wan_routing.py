"""Routes follow measured latency (Petals' min-latency routing, services/coordinator/route_cost.py), in the WAN lab.

The coordinator and the bootstrap sit on undelayed links. (b) Blocks 0:2 on an undelayed host, blocks 2:4 on two
replicas, one behind a 5 ms link, one behind an 80 ms link (one-way, each direction): the coordinator pings the
servers and routes through the near replica; ``GET /mesh/inference/{id}`` shows the route with each hop's
measured round trip and step time and the expected time per token. (a) A whole-model server and a two-server
chain, all at 25 ms: the single server is chosen (fewer hops).

Skips with the reason where the lab cannot be made (not root, missing tools).
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import httpx
import pytest

from infra.processes import ManagedProcess
from infra.swarm import LocalSwarm
from infra.wanlab import LinkShape, WanLab, unavailable_reason
from tests.fixtures.swarm import MODEL_ID, asse_events, create_api_key, start_coordinator
from tests.test_multihost import _via

pytestmark = pytest.mark.swarm

NODE_PORT, DHT_PORT, HTTP_PORT = 31330, 31337, 8000
GENERATIONS, MAX_TOKENS = 3, 8


@pytest.fixture
def lab():
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"the routing test needs the WAN lab: {reason}")
    with WanLab() as made:
        yield made


def _serve_and_generate(lab, tiny_model_dir, postgres_url, redis_url, tmp_path, servers: dict[str, tuple[str, float]]):
    """Bootstrap and coordinator undelayed, each server (name: (span, one-way delay ms)) on its own host; returns
    (the swarm's nodes by name, GET /mesh/inference/{id} of each generation a few tokens in, coordinator log)."""
    hosts = {name: lab.add_host(name) for name in ("dht", "coordinator")}
    for name, (_, delay) in servers.items():
        hosts[name] = lab.add_host(name, LinkShape(delay_ms=delay))
    pg, rd = urlsplit(postgres_url), urlsplit(redis_url)
    lab.relay_to_root({pg.port or 5432: (pg.hostname, pg.port or 5432), rd.port or 6379: (rd.hostname, rd.port or 6379)})
    processes: list[ManagedProcess] = []
    swarm = LocalSwarm(tiny_model_dir, MODEL_ID, tmp_path / "swarm", request_timeout=10)
    try:
        dht = hosts["dht"]
        peers = swarm.start_bootstrap(timeout=180, extra_args=("--host", "0.0.0.0", "--port", str(DHT_PORT),
                                                               "--announce-maddrs", dht.address),
                                      argv_prefix=tuple(dht.argv([])))
        for name, (span, _) in servers.items():
            swarm.start_node(name, span, argv_prefix=tuple(hosts[name].argv([])),
                             extra_args=("--host", "0.0.0.0", "--port", str(NODE_PORT),
                                         "--public-address", hosts[name].address))
        _, api_key = asyncio.run(create_api_key(postgres_url))
        coord = hosts["coordinator"]
        coordinator = start_coordinator(
            workdir=tmp_path / "coordinator", model_dir=tiny_model_dir, initial_peers=peers,
            postgres_url=_via(postgres_url, lab.gateway), redis_url=_via(redis_url, lab.gateway), api_key=api_key,
            host=coord.address, port=HTTP_PORT, argv_prefix=tuple(coord.argv([])),
            env_extra={"PETALS_REQUEST_TIMEOUT_S": "10", "SWARM_READINESS_REFRESH_S": "0.5", "LOG_LEVEL": "DEBUG"})
        processes.append(coordinator.process)
        statuses = asyncio.run(_generate(coordinator))
        log = coordinator.process.tail(2000)
    finally:
        swarm.stop()
        for process in processes:
            process.stop()
    for status in statuses:  # real figures (-s)
        print("[wan-routing]", [(hop["blocks"], hop["rtt_ms"], hop["step_ms"]) for hop in status["route"]],
              status["expected_ms_per_token"])
    return swarm.nodes, statuses, log


def test_the_near_replica_is_chosen_and_the_route_cost_is_shown(lab, tiny_model_dir, make_database, redis_url,
                                                                tmp_path):
    nodes, statuses, log = _serve_and_generate(lab, tiny_model_dir, make_database(), redis_url, tmp_path,
                                               {"first": ("0:2", 0), "near": ("2:4", 5), "far": ("2:4", 80)})
    near, far = nodes["near"].peer_id, nodes["far"].peer_id
    for status in statuses:
        hops = {hop["blocks"]: hop for hop in status["route"]}
        assert hops["2:4"]["peer_id"] == near, status["route"]
        assert 8 <= hops["2:4"]["rtt_ms"] <= 40, hops  # 2 x 5 ms, plus the box's scheduling
        assert hops["2:4"]["step_ms"] >= 10 * 0.8, hops  # at least the 10 ms round trip
        assert status["expected_ms_per_token"] == pytest.approx(
            sum(hop["step_ms"] for hop in status["route"]), abs=0.2)
    assert "route chosen" in log and near in log and "expected_ms_per_token" in log
    assert far not in {hop["peer_id"] for status in statuses for hop in status["route"]}


def test_a_whole_model_server_beats_a_chain_at_equal_delay(lab, tiny_model_dir, make_database, redis_url,
                                                           tmp_path):
    nodes, statuses, _ = _serve_and_generate(lab, tiny_model_dir, make_database(), redis_url, tmp_path,
                                             {"whole": ("0:4", 25), "s1": ("0:2", 25), "s2": ("2:4", 25)})
    for status in statuses:
        assert [(hop["peer_id"], hop["blocks"]) for hop in status["route"]] == [(nodes["whole"].peer_id, "0:4")]


async def _generate(coordinator) -> list[dict]:
    statuses = []
    async with httpx.AsyncClient(base_url=coordinator.url, headers=coordinator.headers, timeout=60) as client:
        deadline = time.monotonic() + 120
        while not (await client.get("/v1/models")).json()["data"][0]["ready"]:
            assert time.monotonic() < deadline, "the coordinator never saw the swarm ready"
            await asyncio.sleep(0.3)
        await asyncio.sleep(3)  # one sequence-manager refresh: the servers are pinged
        for index in range(GENERATIONS):
            request_id = f"wan_route_{index}"
            async with client.stream("POST", "/mesh/inference/generate", json={
                    "prompt": "def compute(a, b):", "max_tokens": MAX_TOKENS, "temperature": 0,
                    "request_id": request_id}) as response:
                assert response.status_code == 200, await response.aread()
                seen = 0
                async for event in asse_events(response):
                    seen += 1
                    if seen == MAX_TOKENS - 2:  # a few decode steps in: step times measured
                        statuses.append((await client.get(f"/mesh/inference/{request_id}")).json())
    return statuses

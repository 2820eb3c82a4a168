"""The coordinator logs when a model's swarm becomes ready and when it stops being ready (issue 18, operations).

A real hivemind DHT in this process and real Petals announcements (``declare_active_modules``, what a Petals server
calls) drive the coordinator's own ``SwarmReadiness``: no server processes are needed to flip block states, so the
test takes about two seconds.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
import structlog

from services.common import petals_adapter  # noqa: F401  (before hivemind/petals)
from services.common.swarm import block_uids
from services.coordinator import readiness as readiness_module
from services.coordinator.metrics import SWARM_READY

MODEL_ID = "test/readiness-log"
NUM_BLOCKS = 4


@pytest.fixture
def dht():
    import hivemind

    node = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        yield node
    finally:
        node.shutdown()


def announce(dht, blocks: range, state: str) -> None:
    from petals.data_structures import ServerInfo, ServerState
    from petals.utils.dht import declare_active_modules

    info = ServerInfo(ServerState[state], throughput=1.0, start_block=blocks.start, end_block=blocks.stop)
    stored = declare_active_modules(dht, block_uids(MODEL_ID, NUM_BLOCKS)[blocks.start:blocks.stop], info,
                                    expiration_time=time.time() + 60)
    assert all(stored.values()), stored


def readiness_events(events: list[dict]) -> list[tuple[str, str]]:
    return [(e["event"], e["log_level"]) for e in events if e["event"] in ("swarm ready", "swarm not ready")]


async def test_swarm_ready_transitions_are_logged_once(dht, monkeypatch):
    swarm = SimpleNamespace(dht=dht, model_id=MODEL_ID, num_blocks=NUM_BLOCKS)
    gate = readiness_module.SwarmReadiness(swarm, refresh_s=60)
    with structlog.testing.capture_logs() as events:
        # a fresh (uncached) logger, so capture works whatever another test configured before
        monkeypatch.setattr(readiness_module, "log", structlog.get_logger(readiness_module.__name__))
        announce(dht, range(0, 2), "ONLINE")  # half the model: not ready at start (info, with the missing blocks)
        assert not (await gate.refresh()).swarm_ready
        await gate.refresh()  # unchanged: no second line
        announce(dht, range(2, 4), "ONLINE")
        assert (await gate.refresh()).swarm_ready
        assert SWARM_READY.labels(MODEL_ID)._value.get() == 1
        await gate.refresh()
        announce(dht, range(2, 4), "OFFLINE")  # a server announces OFFLINE on a graceful stop
        coverage = await gate.refresh()
        await asyncio.sleep(0)
    assert not coverage.swarm_ready and coverage.missing_blocks == [2, 3]
    assert SWARM_READY.labels(MODEL_ID)._value.get() == 0
    assert readiness_events(events) == [("swarm not ready", "info"), ("swarm ready", "info"),
                                        ("swarm not ready", "warning")]
    lost = [e for e in events if e["event"] == "swarm not ready"][-1]
    assert lost["model_id"] == MODEL_ID and lost["previously_ready"] is True
    assert lost["missing_blocks"] == [2, 3] and lost["loaded_blocks"] == 2 and lost["expected_blocks"] == 4
    ready = [e for e in events if e["event"] == "swarm ready"][0]
    assert ready["loaded_blocks"] == 4 and ready["previously_ready"] is False

"""The coordinator's readiness gate: is every block of a model served by an ONLINE server right now?

A background task reads the DHT every ``refresh_s`` (through the coordinator's own Petals client DHT) and keeps
the latest ``Coverage`` (services/common/coverage.py, shared with discovery). Requests are gated on it without
waiting: a model whose swarm is not ready gets 503 ``swarm_not_ready`` at once.

Every change of readiness is logged once (``swarm ready`` / ``swarm not ready``, with the missing blocks and
what blocks inference), and so is the first reading at start: operators grep for these events, and the
``farmesh_swarm_ready`` gauge carries the same state for alerting (deploy/prometheus/far-mesh-alerts.yml).
"""

from __future__ import annotations

import asyncio
import time
from typing import Optional

from services.common.coverage import Coverage, compute_coverage
from services.common.logs import get_logger
from services.coordinator.metrics import SWARM_READY

log = get_logger(__name__)


class SwarmReadiness:
    def __init__(self, swarm, *, refresh_s: float = 2.0):
        self.swarm = swarm
        self.refresh_s = refresh_s
        self.coverage: Optional[Coverage] = None
        self.ready: Optional[bool] = None  # last logged readiness (None: not read yet)
        self._task: Optional[asyncio.Task] = None

    async def refresh(self) -> Coverage:
        from services.common.swarm_state import fetch_block_servers

        now = time.time()
        try:
            servers = await asyncio.to_thread(fetch_block_servers, self.swarm.dht, self.swarm.model_id,
                                              self.swarm.num_blocks)
            coverage = compute_coverage(self.swarm.model_id, self.swarm.num_blocks, servers, now=now, observed_at=now)
        except Exception as error:  # noqa: BLE001 - reported as "not ready" with the reason
            coverage = compute_coverage(self.swarm.model_id, self.swarm.num_blocks, None, now=now,
                                        dht_error=repr(error))
        self.coverage = coverage
        SWARM_READY.labels(self.swarm.model_id).set(1 if coverage.swarm_ready else 0)
        self._log_transition(coverage)
        return coverage

    def _log_transition(self, coverage: Coverage) -> None:
        ready = bool(coverage.swarm_ready)
        if ready == self.ready:
            return
        was = self.ready
        self.ready = ready
        fields = dict(model_id=coverage.model_id, loaded_blocks=coverage.loaded_blocks,
                      expected_blocks=coverage.expected_blocks, previously_ready=was)
        if ready:
            log.info("swarm ready", **fields)
        else:
            # A swarm that was ready and stopped is what pages an operator: warning; not ready at start is info.
            (log.warning if was else log.info)(
                "swarm not ready", **fields, missing_blocks=coverage.missing_blocks,
                loading_blocks=coverage.loading_blocks, dht_connected=coverage.dht_connected,
                blocking=coverage.blocking[:5])

    async def current(self) -> Coverage:
        coverage = self.coverage
        if coverage is None or coverage.observed_at is None or time.time() - coverage.observed_at > 3 * self.refresh_s:
            coverage = await self.refresh()
        return coverage

    async def _loop(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.refresh_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

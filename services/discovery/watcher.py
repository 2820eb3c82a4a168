"""The DHT watcher: reads what the Petals DHT announces for every known model, every DISCOVERY_DHT_REFRESH_S.

It runs a hivemind DHT *client* (``client_mode=True``: it announces nothing) and calls
``petals.utils.dht.get_remote_module_infos`` through :func:`services.common.swarm_state.fetch_block_servers`
in a worker thread, so the event loop never blocks on the DHT. The last good reading of each model is kept with
the time it was taken and the error of the last failed attempt (if any).
"""

from __future__ import annotations

import asyncio
import gc
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from services.common.coverage import update_joining_since
from services.common.logs import get_logger

log = get_logger(__name__)


@dataclass
class Snapshot:
    block_servers: Optional[list] = None  # [[BlockServer]] per block, None = never read
    observed_at: Optional[float] = None
    error: Optional[str] = None
    joining_since: dict = field(default_factory=dict)


class DhtWatcher:
    def __init__(self, initial_peers: list[str], models: dict[str, int], refresh_s: float,
                 on_refresh: Optional[Callable[[str, Snapshot], None]] = None, reachability_interval_s: float = 0.0):
        from services.discovery.reachability import ReachabilityProber

        self.initial_peers = initial_peers
        self.models = models
        self.refresh_s = refresh_s
        self.on_refresh = on_refresh
        self.snapshots: dict[str, Snapshot] = {model_id: Snapshot() for model_id in models}
        self.dht = None
        self.connect_error: Optional[str] = None if initial_peers else "FAR_MESH_DHT_BOOTSTRAP is not set"
        self._task: Optional[asyncio.Task] = None
        self._refreshed = asyncio.Event()
        # dials every announced server like a client would (services/discovery/reachability.py); None = off
        self.prober = (ReachabilityProber(reachability_interval_s)
                       if reachability_interval_s > 0 and self.enabled else None)

    @property
    def enabled(self) -> bool:
        return bool(self.initial_peers)

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._run(), name="dht-watcher")

    def _connect(self):
        from services.common import petals_adapter  # noqa: F401  (hivemind fixes, before hivemind)
        import hivemind

        return hivemind.DHT(initial_peers=self.initial_peers, client_mode=True, start=True, startup_timeout=60)

    async def _run(self) -> None:
        from services.common.swarm_state import fetch_block_servers

        while True:
            started = time.monotonic()
            try:
                if self.dht is None:
                    self.dht = await asyncio.to_thread(self._connect)
                    self.connect_error = None
                    gc.freeze()  # petals/torch/hivemind modules: permanent, keep them out of GC pauses
                    log.info("connected to the DHT", initial_peers=self.initial_peers)
            except Exception as error:  # noqa: BLE001 - keep retrying, report in coverage
                self.connect_error = f"cannot join the DHT via {','.join(self.initial_peers)}: {error}"
                log.warning("DHT connection failed", error=str(error))
            if self.dht is not None:
                for model_id, num_blocks in self.models.items():
                    snapshot = self.snapshots[model_id]
                    try:
                        servers = await asyncio.to_thread(fetch_block_servers, self.dht, model_id, num_blocks)
                    except Exception as error:  # noqa: BLE001
                        snapshot.error = f"{type(error).__name__}: {error}"
                        log.warning("DHT read failed", model_id=model_id, error=snapshot.error)
                    else:
                        now = time.time()
                        update_joining_since(snapshot.joining_since, servers, now)
                        snapshot.block_servers, snapshot.observed_at, snapshot.error = servers, now, None
                    if self.on_refresh is not None:
                        self.on_refresh(model_id, snapshot)
            if self.dht is not None and self.prober is not None:
                try:
                    await asyncio.to_thread(self.prober.probe, self.dht, self.announced_peers())
                except Exception as error:  # noqa: BLE001 - a failed probe round must not stop the DHT reads
                    log.warning("reachability probe failed", error=str(error))
            self._refreshed.set()
            self._refreshed = asyncio.Event()
            await asyncio.sleep(max(0.0, self.refresh_s - (time.monotonic() - started)))

    def announced_peers(self) -> set[str]:
        """Peers the DHT announces as JOINING or ONLINE for any block of any known model."""
        return {server.peer_id for snapshot in self.snapshots.values() for servers in snapshot.block_servers or ()
                for server in servers if server.state in ("JOINING", "ONLINE")}

    def reachability(self, peer_id: str) -> Optional[dict]:
        return self.prober.get(peer_id) if self.prober is not None else None

    @property
    def ready(self) -> bool:
        return self.dht is not None and any(s.observed_at for s in self.snapshots.values())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            self._task = None
        if self.dht is not None:
            dht, self.dht = self.dht, None
            await asyncio.to_thread(dht.shutdown)

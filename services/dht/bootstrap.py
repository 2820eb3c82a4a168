"""``far-mesh dht``: the DHT bootstrap peer everyone joins through.

A plain hivemind DHT peer with a persistent identity key (so its peer ID, and therefore the multiaddrs that
operators hand out, survive restarts). On start it prints its multiaddrs and writes them to a file; on
SIGINT/SIGTERM it shuts the DHT (its process and its p2pd child) down before exiting.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from services.common import petals_compat  # noqa: F401  (hivemind fixes: no UPnP probing)
from services.common.config import get_settings
from services.common.logs import configure_logging, get_logger

log = get_logger(__name__)


def default_identity_path() -> Path:
    return get_settings().FAR_MESH_STATE_DIR / "dht" / "bootstrap.key"


def start_dht(*, host: str, port: int, identity_path: Path, initial_peers: list[str]):
    import hivemind

    identity_path.parent.mkdir(parents=True, exist_ok=True)
    return hivemind.DHT(
        start=True,
        initial_peers=initial_peers,
        host_maddrs=[f"/ip4/{host}/tcp/{port}"],
        identity_path=str(identity_path),
        client_mode=False,
        use_relay=False,
        use_auto_relay=False,
        # the bootstrap peer has no port to map and no relay to find
        startup_timeout=60,
    )


def visible_maddrs(dht) -> list[str]:
    return [str(addr) for addr in dht.get_visible_maddrs()]


def run_bootstrap(*, host: str, port: int, identity_path: Path | None, maddrs_file: Path | None,
                  initial_peers: list[str]) -> None:
    settings = get_settings()
    configure_logging(settings.LOG_LEVEL)
    identity_path = identity_path or default_identity_path()
    maddrs_file = maddrs_file or settings.FAR_MESH_STATE_DIR / "dht" / "maddrs.txt"
    dht = start_dht(host=host, port=port, identity_path=identity_path, initial_peers=initial_peers)
    # Handlers are installed only after the DHT process is forked: a child must keep default signal handling.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        maddrs = visible_maddrs(dht)
        maddrs_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = maddrs_file.with_suffix(".tmp")
        tmp.write_text("\n".join(maddrs) + "\n")
        tmp.replace(maddrs_file)  # readers never see a half-written file
        log.info("dht bootstrap ready", peer_id=str(dht.peer_id), maddrs=maddrs, maddrs_file=str(maddrs_file))
        print("FAR_MESH_DHT_BOOTSTRAP=" + ",".join(maddrs), flush=True)
        while not stop.wait(1.0):
            if not dht.is_alive():
                log.error("dht process died")
                raise SystemExit(1)
    finally:
        log.info("dht bootstrap stopping")
        dht.shutdown()
        dht.join(timeout=10)

"""``far-mesh dht``: the DHT bootstrap peer everyone joins through.

A plain hivemind DHT peer with a persistent identity key (so its peer ID, and therefore the multiaddrs that
operators hand out, survive restarts). It is also the swarm's circuit relay for providers behind NAT and
answers their reachability checks (services/common/p2p_relay.py). On start it prints its multiaddrs and writes them to a file; on
SIGINT/SIGTERM it shuts the DHT (its process and its p2pd child) down before exiting.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from services.common import petals_adapter  # noqa: F401  (hivemind fixes: no UPnP probing)
from services.common.config import CommonSettings, get_settings
from services.common.logs import configure_logging, get_logger

log = get_logger(__name__)


def default_identity_path() -> Path:
    return get_settings(CommonSettings).FAR_MESH_STATE_DIR / "dht" / "bootstrap.key"


def start_dht(*, host: str, port: int, identity_path: Path, initial_peers: list[str],
              announce_maddrs: list[str] | None = None):
    import hivemind

    from services.common import p2p_relay

    p2p_relay.install()
    identity_path.parent.mkdir(parents=True, exist_ok=True)
    return hivemind.DHT(
        start=True,
        initial_peers=initial_peers,
        host_maddrs=[f"/ip4/{host}/tcp/{port}"],
        # what peers are told to dial (e.g. the public address in front of a 0.0.0.0 listener); default: the
        # listen addresses, which for 0.0.0.0 are every interface's, loopback included
        announce_maddrs=announce_maddrs or None,
        identity_path=str(identity_path),
        client_mode=False,
        # a relay for peers behind NAT (bounded: FAR_MESH_RELAY_*); it has no relay to find itself
        use_relay=True,
        use_auto_relay=False,
        startup_timeout=60,
    )


def serve_reachability_checks(dht):
    """Answer a starting server's "can you dial me?" (Petals' check_direct_reachability, which asks the peers it
    knows): a server nobody can dial runs as a DHT client reached through relays. Returns the protocol (its
    ``shutdown()`` stops its probe peer)."""
    from petals.server.reachability import ReachabilityProtocol

    return ReachabilityProtocol.attach_to_dht(dht)


def visible_maddrs(dht) -> list[str]:
    return [str(addr) for addr in dht.get_visible_maddrs()]


def parse_announce_maddrs(text: str, port: int) -> list[str]:
    """``--announce-maddrs``: comma-separated multiaddrs (``/ip4/203.0.113.5/tcp/31337``) or bare IPv4/IPv6
    addresses / DNS names (the listen port is appended). Raises ValueError with the offending item."""
    import ipaddress

    from hivemind.utils.multiaddr import Multiaddr

    result = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item.startswith("/"):
            try:
                Multiaddr(item)
            except Exception as error:  # noqa: BLE001 - multiaddr raises several types
                raise ValueError(f"{item!r} is not a multiaddr: {error}") from None
            result.append(item)
            continue
        if port == 0:
            raise ValueError(f"{item!r}: a bare address needs a fixed --port (with --port 0 the port is unknown)")
        try:
            ip = ipaddress.ip_address(item)
            result.append(f"/ip{ip.version}/{ip}/tcp/{port}")
        except ValueError:
            if not all(part and part.replace("-", "").isalnum() for part in item.split(".")):
                raise ValueError(f"{item!r} is neither a multiaddr, an IP address nor a DNS name") from None
            result.append(f"/dns/{item}/tcp/{port}")
    return result


def run_bootstrap(*, host: str, port: int, identity_path: Path | None, maddrs_file: Path | None,
                  initial_peers: list[str], announce_maddrs: list[str] | None = None) -> None:
    settings = get_settings(CommonSettings)
    configure_logging(settings.LOG_LEVEL)
    identity_path = identity_path or default_identity_path()
    maddrs_file = maddrs_file or settings.FAR_MESH_STATE_DIR / "dht" / "maddrs.txt"
    dht = start_dht(host=host, port=port, identity_path=identity_path, initial_peers=initial_peers,
                    announce_maddrs=announce_maddrs)
    checks = serve_reachability_checks(dht)
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
        checks.shutdown()
        dht.shutdown()
        dht.join(timeout=10)

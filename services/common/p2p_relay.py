"""Circuit relays: how a peer nobody can dial (a home provider behind NAT) still serves, with no flag.

Every peer runs libp2p with relays on. A peer behind NAT learns it from AutoNAT (the bootstrap and other peers
try to dial it back and fail) and then reserves a slot on its *static* relays: the DHT bootstrap peers, plus
``FAR_MESH_RELAYS``. It announces ``/ip4/<relay>/tcp/<port>/p2p/<relay id>/p2p-circuit/p2p/<its id>``, and
clients reach it through that relay. A publicly reachable peer never needs one (AutoNAT says "public") and
offers relay service to others within the bounds of ``FAR_MESH_RELAY_*``.

hivemind's ``P2P.create`` exposes neither the relay service's bounds nor the choice of static relays over
relay *discovery* (which waits for four candidates, up to three minutes, before its first reservation), but
its bundled ``p2pd`` has flags for both; :func:`install` adds them to every p2pd this process starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

P2PD_FLAGS_MARK = "_far_mesh_relay_flags"


@dataclass(frozen=True)
class RelayLimits:
    """What relaying for others may cost this peer (p2pd's relay service resources)."""

    max_reservations: int = 128
    max_circuits: int = 16  # per peer
    time_limit_s: int = 3600
    data_limit_mb: int = 4096

    @classmethod
    def from_settings(cls, settings=None) -> "RelayLimits":
        if settings is None:
            from services.common.config import CommonSettings, get_settings

            settings = get_settings(CommonSettings)
        return cls(settings.FAR_MESH_RELAY_MAX_RESERVATIONS, settings.FAR_MESH_RELAY_MAX_CIRCUITS,
                   settings.FAR_MESH_RELAY_TIME_LIMIT_S, settings.FAR_MESH_RELAY_DATA_LIMIT_MB)


def p2pd_relay_flags(limits: RelayLimits, *, relay: bool, auto_relay: bool, has_trusted_relays: bool) -> dict:
    """The extra p2pd flags (pure): bounds for the relay service; static relays only for auto-relay (none known:
    no auto-relay, p2pd refuses to start with neither)."""
    flags: dict = {}
    if relay:
        flags.update(relayService=int(limits.max_reservations > 0), relayMaxReservations=limits.max_reservations,
                     relayMaxCircuits=limits.max_circuits, relayTimeLimit=f"{limits.time_limit_s}s",
                     relayDataLimit=limits.data_limit_mb << 20)
    if auto_relay and has_trusted_relays:
        flags["relayDiscovery"] = 0  # reserve with the trusted (static) relays at once
    elif auto_relay:
        flags["autoRelay"] = 0
    return flags


def trusted_relays(initial_peers, extra: Optional[str] = None) -> list[str]:
    """The relays a peer behind NAT uses: the bootstrap peers and ``FAR_MESH_RELAYS`` (deduplicated, in order)."""
    if extra is None:
        from services.common.config import CommonSettings, get_settings

        extra = get_settings(CommonSettings).FAR_MESH_RELAYS
    found: list[str] = []
    for peer in [*initial_peers, *(item.strip() for item in extra.split(","))]:
        if peer and peer not in found:
            found.append(str(peer))
    return found


def install(limits: Optional[RelayLimits] = None) -> None:
    """Every p2pd this process starts from now on gets the relay flags (idempotent)."""
    from hivemind.p2p import p2p_daemon

    limits = limits or RelayLimits.from_settings()
    current = p2p_daemon.P2P._make_process_args
    original = getattr(current, P2PD_FLAGS_MARK, current)

    def make_process_args(*args, **kwargs):
        if not kwargs.get("relay"):
            kwargs.pop("trustedRelays", None)  # p2pd refuses relays to trust with relaying off (a probe peer)
        kwargs.update(p2pd_relay_flags(limits, relay=bool(kwargs.get("relay")),
                                       auto_relay=bool(kwargs.get("autoRelay")),
                                       has_trusted_relays=bool(kwargs.get("trustedRelays"))))
        return original(*args, **kwargs)

    setattr(make_process_args, P2PD_FLAGS_MARK, original)
    p2p_daemon.P2P._make_process_args = staticmethod(make_process_args)

"""Who the client really is behind a reverse proxy: ``X-Forwarded-For`` is honoured only when the TCP peer is a
configured trusted proxy (anyone else could write the header), and then read from the right, skipping the trusted
proxies, so a client cannot choose its own address by sending the header itself."""

from __future__ import annotations

from ipaddress import ip_address, ip_network
from typing import Iterable, Optional


def parse_networks(spec: str) -> tuple:
    """``"10.0.0.0/8, 127.0.0.1"`` -> networks; a bad entry raises ValueError naming it."""
    networks = []
    for entry in (part.strip() for part in spec.split(",")):
        if not entry:
            continue
        try:
            networks.append(ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or network") from None
    return tuple(networks)


class TrustedProxies:
    def __init__(self, spec: str = ""):
        self.networks = parse_networks(spec)

    def trusts(self, host: Optional[str]) -> bool:
        try:
            address = ip_address((host or "").strip())
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    def client(self, peer: Optional[str], forwarded_for: Iterable[str] = ()) -> str:
        """The client's address: the TCP peer, or — when the peer is a trusted proxy — the rightmost
        ``X-Forwarded-For`` entry that is not a trusted proxy (each header value may list several)."""
        if not peer:
            return "unknown"
        if not self.trusts(peer):
            return peer
        hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self.trusts(hop):
                return hop
        return hops[0] if hops else peer

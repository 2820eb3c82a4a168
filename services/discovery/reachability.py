"""Can the swarm reach a provider? Discovery dials every server the DHT announces, the way a client would.

A server announces its blocks through the DHT bootstrap over a connection *it* opened, so a node behind NAT, or
one that listens on 127.0.0.1 or announces the wrong ``--public-address``, shows up ONLINE in the DHT although no
client can ever open a session with it: it would serve nobody and earn nothing, silently. Petals' own check
(petals/server/reachability.py) asks health.petals.dev or other Petals servers and only decides about relays;
ours is a plain libp2p ping from discovery's DHT client (a fresh dial to the addresses the node announced, found
through the libp2p DHT like any client does). A provider behind NAT is reached through a circuit relay: the
verdict then names the relay (``via_relay``). The answer is shown on the node's record (``GET /nodes/...``), in
each heartbeat answer (the node logs it and prints it on its status line) and by ``far-node status``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

from services.common.logs import get_logger

log = get_logger(__name__)

# The usual causes, in words an operator can act on.
HINT = ("the swarm cannot open a connection to the address this node announces: listen on an address others can "
        "reach (far-node run --host 0.0.0.0 --port 31330), announce the address they dial (--public-address "
        "<public IP>), and forward that TCP port through NAT/firewall")


CIRCUIT = "/p2p-circuit"


def relay_of(addresses: list) -> Optional[str]:
    """The relay's peer ID when every address the dial used is a circuit (``…/p2p/<relay>/p2p-circuit…``)."""
    relays = []
    for address in addresses:
        head, circuit, _ = str(address).partition(CIRCUIT)
        if not circuit:
            return None  # a direct connection exists
        relays.append(head.rsplit("/p2p/", 1)[-1] if "/p2p/" in head else head)
    return relays[0] if relays else None


def describe(reach: Optional[dict]) -> str:
    """One line for people: ``yes (direct: …)``, ``via relay <peer>`` or ``NO: <why>`` (status, logs, CLI)."""
    if not isinstance(reach, dict) or reach.get("reachable") is None:
        return "- (not checked yet)"
    if not reach["reachable"]:
        return f"NO: {reach.get('error') or 'no answer'}"
    if reach.get("via_relay"):
        return f"via relay {reach['via_relay']}"
    return "yes" + (f" ({', '.join(reach['addresses'])})" if reach.get("addresses") else "")


PROTOCOL_REFUSED = "protocols not supported"  # p2pd's words: the peer was reached but serves no such RPC


@dataclass
class Reachability:
    reachable: bool
    checked_at: float
    error: Optional[str] = None
    addresses: list = field(default_factory=list)  # the address a successful dial used

    def to_dict(self) -> dict:
        return {"reachable": self.reachable, "checked_at": self.checked_at,
                "error": self.error, "hint": None if self.reachable else HINT, "addresses": self.addresses,
                "via_relay": relay_of(self.addresses) if self.reachable else None}


async def _ping(_dht, node, peer_ids: list[str], timeout: float) -> dict[str, tuple[bool, Optional[str], list]]:
    """Runs inside the DHT process: one ping RPC to each peer (concurrently); returns (ok, error, addresses)."""
    from hivemind.p2p import PeerID
    from hivemind.proto import dht_pb2

    protocol = node.protocol

    async def one(peer_id: str):
        try:
            peer = PeerID.from_base58(peer_id)
            request = dht_pb2.PingRequest(peer=protocol.node_info, validate=False)
            response = await asyncio.wait_for(protocol.get_stub(peer).rpc_ping(request, timeout=timeout),
                                              timeout=timeout + 1)
            if not (response.peer and response.peer.node_id):
                return False, "the peer answered without a DHT node id", []
        except (asyncio.TimeoutError, TimeoutError):
            return False, (f"no answer within {timeout:g} s: nothing accepted a connection for this peer at the "
                           "address it announces (or its host dropped the packets)"), []
        except Exception as error:  # noqa: BLE001 - any failure to dial/answer is "unreachable"; keep the words
            text = str(error) or type(error).__name__
            if PROTOCOL_REFUSED not in text:
                return False, f"{type(error).__name__}: {text}"[:500], []
            # connected and negotiated: a server behind a relay is a DHT *client* and has no DHT ping to answer
        addresses = []
        try:
            for info in await protocol.p2p.list_peers():
                if str(info.peer_id) == peer_id:
                    addresses = sorted({str(addr) for addr in info.addrs})
        except Exception:  # noqa: BLE001 - addresses are a courtesy
            pass
        return True, None, addresses

    results = await asyncio.gather(*(one(peer_id) for peer_id in peer_ids))
    return dict(zip(peer_ids, results))


class ReachabilityProber:
    """Probes each announced peer every ``interval_s`` (new peers first); keeps the last answer per peer."""

    def __init__(self, interval_s: float, timeout_s: float = 5.0, max_per_round: int = 32):
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.max_per_round = max_per_round
        self.results: dict[str, Reachability] = {}

    def due(self, peer_ids: set[str], now: float) -> list[str]:
        """Peers never probed first, then the longest unprobed, at most ``max_per_round``."""
        waiting = [p for p in peer_ids if p not in self.results or now - self.results[p].checked_at >= self.interval_s]
        waiting.sort(key=lambda p: self.results[p].checked_at if p in self.results else 0.0)
        return waiting[: self.max_per_round]

    def probe(self, dht, peer_ids: set[str]) -> None:
        """Blocking (run it in a worker thread): ping the peers that are due, record and log changes."""
        for peer_id in set(self.results) - peer_ids:
            del self.results[peer_id]  # no longer announced: forget it
        due = self.due(peer_ids, time.time())
        if not due:
            return
        answers = dht.run_coroutine(partial(_ping, peer_ids=due, timeout=self.timeout_s))
        now = time.time()
        for peer_id, (ok, error, addresses) in answers.items():
            before = self.results.get(peer_id)
            self.results[peer_id] = Reachability(ok, now, error, addresses)
            if before is None or before.reachable != ok:
                if ok:
                    log.info("peer reachable from discovery", peer_id=peer_id, addresses=addresses)
                else:
                    log.warning("peer announced in the DHT but unreachable from discovery", peer_id=peer_id,
                                error=error)

    def get(self, peer_id: str) -> Optional[dict]:
        result = self.results.get(peer_id)
        return result.to_dict() if result is not None else None

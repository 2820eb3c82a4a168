"""Swarm coverage: which blocks of a model are announced / loaded, and what is blocking inference (pure).

Network-free and importable without FastAPI or petals: the discovery service (``GET /models/{id}/coverage``,
``far-mesh status``) and the coordinator's readiness gate both call :func:`compute_coverage`.

Inputs are what the DHT announces per block (objects shaped like
:class:`services.common.swarm_state.BlockServer`: ``peer_id``, ``state``, ``start_block``, ``end_block``,
``public_name``), the nodes registered with discovery (:class:`RegisteredNode`), the time each peer was first
seen JOINING, and ``now``. Vocabulary (as in docs/discovery.md):

* discovered: a server announced the block in the DHT, state JOINING or ONLINE (OFFLINE does not count:
  Petals announces OFFLINE on a graceful stop);
* loaded: a server announced the block ONLINE (it has loaded it and serves it);
* ``missing_blocks``: no server announced; ``loading_blocks``: announced, but none ONLINE yet;
* ``swarm_ready``: every block has an ONLINE server.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Optional, Protocol, Sequence

from services.common.states import NodeState

ANNOUNCED_STATES = ("JOINING", "ONLINE")


class AnnouncedServer(Protocol):
    peer_id: str
    state: str
    start_block: Optional[int]
    end_block: Optional[int]
    public_name: Optional[str]


@dataclass(frozen=True)
class RegisteredNode:
    """A node as discovery's registry knows it."""

    peer_id: str
    node_id: str
    start_block: int
    end_block: int
    state: NodeState = NodeState.ONLINE
    live: bool = True  # heartbeat within NODE_HEARTBEAT_TTL_S
    last_seen: Optional[float] = None  # unix time of the last heartbeat
    public_name: Optional[str] = None


@dataclass
class BlockCoverage:
    block: int
    discovered: list = field(default_factory=list)  # peer IDs announcing JOINING or ONLINE
    loaded: list = field(default_factory=list)  # peer IDs announcing ONLINE


@dataclass
class Coverage:
    model_id: str
    expected_blocks: int
    discovered_blocks: int
    loaded_blocks: int
    swarm_ready: bool
    missing_blocks: list
    loading_blocks: list
    blocks: list  # [BlockCoverage]
    blocking: list  # [str], plain words
    dht_connected: bool = True
    observed_at: Optional[float] = None  # when the DHT was read (unix time)

    def to_dict(self) -> dict:
        return asdict(self)


def format_ranges(blocks: Iterable[int]) -> list[str]:
    """[2, 3, 5, 7, 8, 9] -> ["2-3", "5", "7-9"]."""
    ordered = sorted(set(blocks))
    ranges: list[str] = []
    start = prev = None
    for block in ordered:
        if start is None:
            start = prev = block
        elif block == prev + 1:
            prev = block
        else:
            ranges.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = block
    if start is not None:
        ranges.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ranges


def describe_blocks(blocks: Iterable[int]) -> str:
    """[2, 3] -> "blocks 2-3"; [5] -> "block 5"; [1, 2, 5] -> "blocks 1-2, 5"."""
    ordered = sorted(set(blocks))
    word = "block" if len(ordered) == 1 else "blocks"
    return f"{word} {', '.join(format_ranges(ordered))}"


def _span_blocks(start: Optional[int], end: Optional[int], num_blocks: int) -> list[int]:
    if start is None or end is None:
        return []
    return list(range(max(0, start), min(end, num_blocks)))


def _who(peer_id: str, name: Optional[str]) -> str:
    return f'"{name}" ({peer_id})' if name else peer_id


def _block_coverage(servers_per_block: list[list[AnnouncedServer]]) -> tuple[list[BlockCoverage], dict[str, dict]]:
    """Per block, the peers announcing it; per announcing peer, ``{"name", "blocks": set, "states": {block: state}}``."""
    blocks: list[BlockCoverage] = []
    announced: dict[str, dict] = {}
    for index, servers in enumerate(servers_per_block):
        entry = BlockCoverage(index)
        for server in servers:
            if server.state not in ANNOUNCED_STATES:
                continue
            if server.peer_id not in entry.discovered:
                entry.discovered.append(server.peer_id)
            if server.state == "ONLINE" and server.peer_id not in entry.loaded:
                entry.loaded.append(server.peer_id)
            info = announced.setdefault(server.peer_id, {"name": server.public_name, "blocks": set(), "states": {}})
            info["blocks"].add(index)
            info["states"][index] = server.state
            info["name"] = info["name"] or server.public_name
        entry.discovered.sort()
        entry.loaded.sort()
        blocks.append(entry)
    return blocks, announced


def _joining_too_long(announced: dict[str, dict], joining_since: Mapping[str, float], now: float,
                      joining_too_long_s: float) -> list[str]:
    """Servers JOINING for longer than expected."""
    reasons = []
    for peer_id, info in sorted(announced.items()):
        joining_blocks = [b for b, state in info["states"].items() if state == "JOINING"]
        since = joining_since.get(peer_id)
        if joining_blocks and since is not None and now - since > joining_too_long_s:
            reasons.append(
                f"server {_who(peer_id, info['name'])} has been JOINING {describe_blocks(joining_blocks)} for "
                f"{int(now - since)} s (more than {int(joining_too_long_s)} s): still loading? check its logs "
                "(download, memory, disk)")
    return reasons


def _registry_mismatches(announced: dict[str, dict], registered: Sequence[RegisteredNode], num_blocks: int,
                         now: float, heartbeat_ttl_s: float, *, dht_connected: bool) -> list[str]:
    """Where the DHT and discovery's registry disagree: registered nodes the DHT does not show, and peers serving
    blocks that are not (or no longer) registered, or whose agent stopped heartbeating."""
    reasons = []
    registered_by_peer = {node.peer_id: node for node in registered}
    if dht_connected:
        for node in sorted(registered, key=lambda n: n.peer_id):
            if node.state != NodeState.ONLINE or not node.live or node.peer_id in announced:
                continue
            span = describe_blocks(_span_blocks(node.start_block, node.end_block, num_blocks) or [node.start_block])
            reasons.append(f"node {_who(node.peer_id, node.public_name)} is registered for {span} but absent "
                           "from the DHT: check that its server runs and that its port/address is reachable")
    for peer_id, info in sorted(announced.items()):
        node = registered_by_peer.get(peer_id)
        span = describe_blocks(info["blocks"])
        if node is None:
            reasons.append(f"peer {_who(peer_id, info['name'])} serves {span} but is not registered: "
                           "it earns nothing")
        elif node.state != NodeState.ONLINE:
            # Payment rule (docs/discovery.md "Who is paid"): a peer that registered is paid for the work its server
            # does, to the wallet it registered, even after it unregistered; only never-registered peers earn nothing.
            reasons.append(f"peer {_who(peer_id, info['name'] or node.public_name)} serves {span} but its node "
                           f"unregistered (state {node.state}): it is not listed as active; its work is still paid "
                           "to the wallet it registered")
        elif not node.live:
            silent = f" for {int(now - node.last_seen)} s" if node.last_seen else ""
            reasons.append(f"node {_who(peer_id, node.public_name or info['name'])} serves {span} but sent no "
                           f"heartbeat{silent} (limit {int(heartbeat_ttl_s)} s): it is not active")
    return reasons


def compute_coverage(
    model_id: str,
    num_blocks: int,
    block_servers: Optional[Sequence[Sequence[AnnouncedServer]]],
    registered: Sequence[RegisteredNode] = (),
    joining_since: Optional[Mapping[str, float]] = None,
    now: float = 0.0,
    *,
    joining_too_long_s: float = 300.0,
    heartbeat_ttl_s: float = 90.0,
    observed_at: Optional[float] = None,
    dht_error: Optional[str] = None,
) -> Coverage:
    """Coverage of ``model_id`` and the reasons inference is (or would be) held up.

    ``block_servers[i]`` lists the servers the DHT announces for block ``i`` (``None`` = the DHT was not read:
    every block counts as missing and the first reason says why). ``registered`` are the nodes registered for
    this model; ``joining_since`` maps a peer ID to the time it was first seen JOINING (and not ONLINE since).
    """
    dht_connected = block_servers is not None
    servers_per_block: list[list[AnnouncedServer]] = [
        list(block_servers[i]) if block_servers is not None and i < len(block_servers) else []
        for i in range(num_blocks)
    ]
    blocks, announced = _block_coverage(servers_per_block)
    missing = [b.block for b in blocks if not b.discovered]
    loading = [b.block for b in blocks if b.discovered and not b.loaded]
    discovered_count = num_blocks - len(missing)
    loaded_count = sum(1 for b in blocks if b.loaded)
    ready = dht_connected and num_blocks > 0 and loaded_count == num_blocks

    blocking: list[str] = []
    if not dht_connected:
        blocking.append(f"discovery cannot read the DHT: {dht_error or 'not connected'}")
    elif dht_error:
        blocking.append(f"last DHT read failed ({dht_error}); showing the previous swarm state")
    if dht_connected and missing:
        blocking.append(f"{describe_blocks(missing)}: no server announced")
    if loading:
        joining = sorted({p for b in loading for p in blocks[b].discovered})
        blocking.append(f"{describe_blocks(loading)}: announced but not loaded yet "
                        f"({len(joining)} server{'s' if len(joining) != 1 else ''} JOINING)")
    blocking += _joining_too_long(announced, joining_since or {}, now, joining_too_long_s)
    blocking += _registry_mismatches(announced, registered, num_blocks, now, heartbeat_ttl_s,
                                     dht_connected=dht_connected)

    return Coverage(
        model_id=model_id,
        expected_blocks=num_blocks,
        discovered_blocks=discovered_count,
        loaded_blocks=loaded_count,
        swarm_ready=ready,
        missing_blocks=missing,
        loading_blocks=loading,
        blocks=blocks,
        blocking=blocking,
        dht_connected=dht_connected,
        observed_at=observed_at,
    )


def update_joining_since(joining_since: dict, block_servers: Sequence[Sequence[AnnouncedServer]],
                         now: float) -> dict:
    """Track when each peer was first seen JOINING: kept while it still announces a block JOINING, dropped
    once none of its blocks is JOINING (it went ONLINE or left). Returns the updated dict (also mutated)."""
    joining_now = {server.peer_id for servers in block_servers for server in servers if server.state == "JOINING"}
    for peer_id in list(joining_since):
        if peer_id not in joining_now:
            del joining_since[peer_id]
    for peer_id in joining_now:
        joining_since.setdefault(peer_id, now)
    return joining_since

"""What the Petals DHT announces for a model: per block, which peer serves it in which state.

``fetch_block_servers`` asks the DHT (``petals.utils.dht.get_remote_module_infos``); the rest is pure.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common import petals_adapter  # noqa: F401
from services.common.swarm import block_uids


@dataclass(frozen=True)
class BlockServer:
    peer_id: str
    state: str  # "JOINING" | "ONLINE" | "OFFLINE"
    start_block: int | None
    end_block: int | None
    public_name: str | None = None


def fetch_block_servers(dht, model_id: str, num_blocks: int) -> list[list[BlockServer]]:
    """For each block index, the servers the DHT currently announces for it (latest entries)."""
    from petals.utils.dht import get_remote_module_infos

    infos = get_remote_module_infos(dht, block_uids(model_id, num_blocks), latest=True)
    result: list[list[BlockServer]] = []
    for info in infos:
        servers = []
        if info is not None:
            for peer_id, server in info.servers.items():
                servers.append(BlockServer(peer_id.to_base58(), server.state.name, server.start_block,
                                           server.end_block, server.public_name))
        result.append(servers)
    return result


def online_peers_per_block(block_servers: list[list[BlockServer]]) -> list[set[str]]:
    return [{s.peer_id for s in servers if s.state == "ONLINE"} for servers in block_servers]


def missing_blocks(block_servers: list[list[BlockServer]]) -> list[int]:
    """Blocks without any ONLINE server."""
    return [i for i, peers in enumerate(online_peers_per_block(block_servers)) if not peers]

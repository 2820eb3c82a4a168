"""A whole local Petals swarm on loopback: one DHT bootstrap and provider nodes, as subprocesses.

Used by ``make demo``, the benchmarks and the test fixtures. Identity keys are generated up front, so every
node's peer ID is known before it starts (the demo registers nodes by peer ID).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from infra.processes import ManagedProcess, python_argv, wait_until
from services.common.swarm import BlockSpan


def ensure_identity(path: Path) -> str:
    """Create a libp2p identity key file once; return its peer ID (base58)."""
    from services.common.identity import create_identity, load_identity

    create_identity(path)
    return load_identity(path).peer_id


@dataclass
class SwarmNode:
    name: str
    span: BlockSpan
    peer_id: str
    identity: Path
    process: ManagedProcess


@dataclass
class LocalSwarm:
    model_path: Path
    model_id: str
    workdir: Path
    request_timeout: float = 180.0
    update_period: float = 15.0
    bootstrap: Optional[ManagedProcess] = None
    nodes: dict = field(default_factory=dict)
    initial_peers: list = field(default_factory=list)
    _dht = None

    def start_bootstrap(self, timeout: float = 60.0, *, extra_args: tuple[str, ...] = ("--port", "0"),
                        argv_prefix: tuple[str, ...] = ()) -> list[str]:
        """``far-mesh dht`` (``extra_args``: --host/--port/--announce-maddrs; ``argv_prefix`` e.g. runs it in a
        network namespace, infra/netns.py); returns the multiaddrs it prints."""
        maddrs_file = self.workdir / "dht" / "maddrs.txt"
        maddrs_file.unlink(missing_ok=True)
        self.bootstrap = ManagedProcess(
            "dht-bootstrap",
            [*argv_prefix, *python_argv("services.cli", "dht", *extra_args,
                                        "--identity", str(self.workdir / "dht" / "bootstrap.key"),
                                        "--maddrs-file", str(maddrs_file))],
            log_path=self.workdir / "logs" / "dht.log",
        ).start()
        wait_until(maddrs_file.exists, timeout=timeout, what="the DHT bootstrap's multiaddrs", process=self.bootstrap)
        self.initial_peers = [line for line in maddrs_file.read_text().split() if line]
        return self.initial_peers

    def start_node(self, name: str, span: str, *, extra_args: tuple[str, ...] = (),
                   discovery_url: Optional[str] = None, wallet: Optional[str] = None,
                   argv_prefix: tuple[str, ...] = ()) -> SwarmNode:
        """Start a provider node. Without a discovery URL (``discovery_url``, or ``--discovery-url`` in
        ``extra_args``) it serves without registering (``--no-register``)."""
        import os

        identity = self.workdir / "nodes" / f"{name}.key"
        peer_id = ensure_identity(identity)
        registers = bool(discovery_url) or "--discovery-url" in extra_args
        # the node's run/registration files go to the swarm's workdir, not the project's state dir
        env = dict(os.environ, FAR_MESH_STATE_DIR=str(self.workdir / "nodes" / f"{name}-state"))
        process = ManagedProcess(
            f"node-{name}",
            [*argv_prefix, *python_argv(
                "node_server.cli", "run", "--model", str(self.model_path), "--model-id", self.model_id,
                "--blocks", span, "--initial-peers", ",".join(self.initial_peers),
                "--identity", str(identity), "--public-name", name,
                "--request-timeout", str(self.request_timeout),
                "--update-period", str(self.update_period), "--no-config",
                *(("--discovery-url", discovery_url) if discovery_url else ()),
                *(() if registers else ("--no-register",)),
                *(("--wallet", wallet) if wallet else ()), *extra_args)],
            log_path=self.workdir / "logs" / f"node-{name}.log", env=env,
        ).start()
        node = SwarmNode(name, BlockSpan.parse(span), peer_id, identity, process)
        self.nodes[name] = node
        return node

    def node_status(self, name: str) -> dict:
        """What the node's server child last wrote to its status file (state, span, batching counters)."""
        import json

        node = self.nodes[name]
        path = self.workdir / "nodes" / f"{name}-state" / "node" / "run" / f"{node.peer_id}.status.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def dht_client(self):
        if self._dht is None:
            from services.common import petals_adapter  # noqa: F401
            import hivemind

            self._dht = hivemind.DHT(initial_peers=self.initial_peers, client_mode=True, start=True)
        return self._dht

    def online_peers(self, num_blocks: int) -> list[set[str]]:
        from services.common.swarm_state import fetch_block_servers, online_peers_per_block

        return online_peers_per_block(fetch_block_servers(self.dht_client(), self.model_id, num_blocks))

    def wait_online(self, names: list[str], num_blocks: int, timeout: float = 120.0) -> None:
        """Wait until every named node is announced ONLINE for each block of its span."""

        def ready() -> bool:
            online = self.online_peers(num_blocks)
            for name in names:
                node = self.nodes[name]
                if not node.process.alive():
                    raise RuntimeError(f"node {name} exited:\n{node.process.tail()}")
                if any(node.peer_id not in online[b] for b in range(node.span.start, node.span.end)):
                    return False
            return True

        wait_until(ready, timeout=timeout, interval=0.5, what=f"nodes {names} ONLINE")

    def wait_gone(self, name: str, num_blocks: int, timeout: float = 60.0) -> None:
        node = self.nodes[name]
        wait_until(lambda: all(node.peer_id not in peers for peers in self.online_peers(num_blocks)),
                   timeout=timeout, interval=0.5, what=f"node {name} no longer ONLINE")

    def stop(self) -> None:
        if self._dht is not None:
            self._dht.shutdown()
            self._dht = None
        # all at once: each node announces OFFLINE and unregisters on SIGTERM (seconds), independently
        from concurrent.futures import ThreadPoolExecutor

        nodes = list(self.nodes.values())
        if nodes:
            with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
                list(pool.map(lambda node: node.process.stop(), nodes))
        if self.bootstrap is not None:
            self.bootstrap.stop()

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


"""What ``far-node run`` serves with: its flags over the node's config file over the environment's settings.

:func:`resolve_run_options` is the whole merge and every check of it, with no I/O of its own: what touches the
machine (building a catalog model's weights, the GPU's default dtype, a model's block count) comes in as
functions, so the merge is tested with plain values (tests/test_node_run_options.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from node_server import validation
from node_server.config import NodeConfig
from node_server.petals_server import ServerOptions
from services.common.swarm import BlockSpan


class RunOptionError(ValueError):
    """A value ``far-node run`` cannot serve with: the flag (or its config key) and why."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag, self.message = flag, message


@dataclass(frozen=True)
class RunFlags:
    """The command line of ``far-node run``; None: not given (the config file or a default decides)."""

    model: Optional[str] = None
    blocks: Optional[str] = None
    num_blocks: Optional[int] = None
    initial_peers: Optional[str] = None
    model_id: Optional[str] = None
    host: Optional[str] = None
    port: Optional[int] = None
    public_address: Optional[str] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    memory_limit: Optional[str] = None
    wallet: Optional[str] = None
    identity: Optional[Path] = None
    public_name: Optional[str] = None
    throughput: float = 1.0
    request_timeout: float = 180.0
    update_period: float = 15.0
    discovery_url: Optional[str] = None
    no_register: bool = False
    heartbeat_interval: Optional[float] = None
    batching: bool = True
    batch_wait_ms: float = 50.0
    torch_threads: int = 1


@dataclass(frozen=True)
class RunOptions:
    server: ServerOptions
    identity_path: Path
    wallet_address: Optional[str]  # None only when the node does not register
    discovery_url: Optional[str]  # None: serve without registering
    heartbeat_interval: Optional[float]  # None: what discovery says


@dataclass(frozen=True)
class Machine:
    """What the merge needs from the machine. ``prepare_weights(model_id, model, model_is_dir)``: the directory or
    hub name to load; ``default_dtype(device)``; ``model_num_blocks(model)``; ``is_dir(model)``."""

    prepare_weights: Callable[[str, Optional[str], bool], str]
    default_dtype: Callable[[str], str]
    model_num_blocks: Callable[[str], int]
    is_dir: Callable[[str], bool]
    state_dir: Path


def _pick(flag_value, config_value, default=None):
    return flag_value if flag_value is not None else (config_value if config_value is not None else default)


def _check(flag: str, value, parse):
    try:
        return parse(value)
    except ValueError as error:
        raise RunOptionError(flag, str(error)) from None


def resolve_run_options(flags: RunFlags, node: NodeConfig, settings, machine: Machine, *,
                        from_config_file: bool) -> RunOptions:
    """The options of the server and of its registration; raises :class:`RunOptionError` for the first value that
    cannot be served with. ``settings``: the node's environment (``FAR_MESH_MODEL_PATH``, ``DEFAULT_MODEL_ID``,
    ``FAR_MESH_DHT_BOOTSTRAP``, ``DISCOVERY_URL``); ``from_config_file``: ``node`` was read from a file."""
    model = _pick(flags.model, node.model, settings.FAR_MESH_MODEL_PATH or None)
    model_is_dir = model is not None and machine.is_dir(model)
    # --model names the weights (a directory, a catalog model or a hub name); the announced id defaults to it
    model_id = _pick(flags.model_id, node.model_id, model if model and not model_is_dir else settings.DEFAULT_MODEL_ID)
    model = machine.prepare_weights(model_id, model, model_is_dir)
    peers_text = _pick(flags.initial_peers, ",".join(node.initial_peers) or None, settings.FAR_MESH_DHT_BOOTSTRAP)
    peers = [p.strip() for p in (peers_text or "").split(",") if p.strip()]
    if not peers:
        raise RunOptionError("--initial-peers", "no DHT bootstrap peers (give --initial-peers or set "
                                                "FAR_MESH_DHT_BOOTSTRAP)")
    device = _check("--device", _pick(flags.device, node.device, "cpu"), validation.parse_device)
    # float32 on CPU; on a GPU half precision as Petals supports it
    dtype = _pick(flags.dtype, node.dtype)
    if dtype is None:
        dtype = machine.default_dtype(device)
    dtype = _check("--dtype", dtype, lambda v: validation.parse_dtype(v, device))
    memory_limit_gb = (_check("--memory-limit", flags.memory_limit, validation.parse_memory_limit)
                       if flags.memory_limit is not None else node.memory_limit_gb)
    span, num_blocks = _blocks(flags, node, model, machine, from_config_file=from_config_file)
    host, port, announce = _addresses(flags, node)
    url = _pick(flags.discovery_url, node.discovery_url, settings.DISCOVERY_URL)
    url = None if flags.no_register or not (url or "").strip() else url.strip()
    wallet_address = _pick(flags.wallet, node.wallet_address)
    if url is not None:
        if wallet_address is None:
            raise RunOptionError("--wallet", "no payout wallet configured: run `far-node start`, pass --wallet, or "
                                             "--no-register")
        wallet_address = _check("--wallet", wallet_address, validation.parse_wallet)
    if flags.heartbeat_interval is not None and flags.heartbeat_interval <= 0:
        raise RunOptionError("--heartbeat-interval", "must be positive")
    identity_path = Path(_pick(flags.identity, node.identity_path, machine.state_dir / "identity.key")).expanduser()
    server = ServerOptions(
        model_path=model, model_id=model_id, initial_peers=tuple(peers), blocks=span, num_blocks=num_blocks,
        host=host, port=port, announce_host=announce, identity_path=str(identity_path),
        public_name=_pick(flags.public_name, node.public_name), device=device, torch_dtype=dtype,
        throughput=flags.throughput, request_timeout=flags.request_timeout, update_period=flags.update_period,
        memory_limit_gb=memory_limit_gb, batching=flags.batching, batch_wait_ms=flags.batch_wait_ms,
        torch_threads=flags.torch_threads)
    return RunOptions(server=server, identity_path=identity_path, wallet_address=wallet_address, discovery_url=url,
                      heartbeat_interval=flags.heartbeat_interval)


def _blocks(flags: RunFlags, node: NodeConfig, model: str, machine: Machine, *,
            from_config_file: bool) -> tuple[Optional[BlockSpan], Optional[int]]:
    """The block span (None: Petals picks) and, with no span, how many blocks (None: fit the memory)."""
    blocks_text = _pick(flags.blocks, node.blocks if from_config_file else None)
    num_blocks = _pick(flags.num_blocks, node.num_blocks)
    if blocks_text and blocks_text.strip().lower() != validation.AUTO:
        try:
            return BlockSpan.parse(blocks_text, machine.model_num_blocks(model)), num_blocks
        except ValueError as error:
            raise RunOptionError("--blocks", str(error)) from None
    if blocks_text is None and not num_blocks and not from_config_file:
        raise RunOptionError("--blocks", "give a block span (e.g. 0:2), --blocks auto or --num-blocks")
    return None, num_blocks


def _addresses(flags: RunFlags, node: NodeConfig) -> tuple[str, int, Optional[str]]:
    """(listen host, port, announced address or None: the listen address is the one others dial)."""
    port = _pick(flags.port, node.port, 0)
    if not 0 <= port <= 65535:
        raise RunOptionError("--port", f"{port} is not a TCP port")
    host = _pick(flags.host, node.host, "127.0.0.1")
    announce = _pick(flags.public_address, node.public_address)
    if announce is not None:
        announce = _check("--public-address", announce, validation.parse_address)
        if announce == host or announce == "localhost":
            announce = None
        elif port == 0:
            # others dial <address>:<port>; with port 0 the port is picked at start and unknown to the announcement
            raise RunOptionError("--public-address", "needs a fixed --port (e.g. --port 31330, forwarded to this "
                                                     "machine)")
    return host, port, announce

"""Run a Petals server for a span of a model's blocks, with the flags this stack needs.

``far-node run`` (the supervisor, :mod:`node_server.agent`) starts this module as a child process:
``python -m node_server.petals_server --options FILE.json --status-file FILE.json``. The child writes what it
announces to the swarm (state JOINING/ONLINE/OFFLINE, the span it chose, device and memory) to the status file
every second, so the supervisor knows the span to register without running a DHT peer of its own.

``ServerOptions`` is the typed description of one server; :func:`petals_server_kwargs` turns it into
``petals.server.server.Server`` keyword arguments (pure, tested without a network). The flags that are always
set are the ones this stack needs (docs/provider.md): explicit initial peers, a numeric throughput (no
benchmark at start), explicit host multiaddrs, an explicit DHT prefix, float32 without quantization on CPU,
no UPnP, no health.petals.dev; circuit relays when nobody can dial the server (:func:`relay_kwargs`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from services.common.process_tree import reap_children
from services.common.swarm import BlockSpan, dht_prefix_for


@dataclass(frozen=True)
class ServerOptions:
    model_path: str
    model_id: str
    initial_peers: tuple[str, ...]
    blocks: Optional[BlockSpan] = None  # None: let Petals choose the least covered blocks
    num_blocks: Optional[int] = None  # with blocks=None: how many to serve
    host: str = "127.0.0.1"
    port: int = 0
    announce_host: Optional[str] = None
    identity_path: Optional[str] = None
    public_name: Optional[str] = None
    device: str = "cpu"
    torch_dtype: str = "float32"
    throughput: float = 1.0
    num_handlers: int = 4
    inference_max_length: Optional[int] = None  # None: the model's context (max_position_embeddings)
    attn_cache_tokens: Optional[int] = None  # None: Petals' default, raised to hold one full-context session
    update_period: float = 15.0
    request_timeout: float = 180.0
    memory_limit_gb: Optional[float] = None  # CUDA: per-process memory fraction; auto span: how many blocks fit
    batching: bool = True  # batch concurrent sessions' decode steps (node_server/batching.py, docs/batching.md)
    batch_max_sessions: int = 64
    prefill_chunk_tokens: int = 64
    batch_wait_ms: float = 50.0  # wait at most this long for the sessions that shared their previous pass
    torch_threads: int = 1  # CPU threads for torch: 1 where servers share a host's cores (measured fastest here)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["blocks"] = str(self.blocks) if self.blocks is not None else None
        data["initial_peers"] = list(self.initial_peers)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "ServerOptions":
        data = json.loads(text)
        data["blocks"] = BlockSpan.parse(data["blocks"]) if data.get("blocks") else None
        data["initial_peers"] = tuple(data.get("initial_peers") or ())
        return cls(**data)


LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def relay_kwargs(options: ServerOptions) -> dict:
    """Relays with no flag (pure): Petals asks the peers it knows (the bootstrap, other servers) to dial it; if
    they cannot, the server is a DHT client reached through circuit relays (the bootstrap peers and
    FAR_MESH_RELAYS, reserved as soon as AutoNAT finds it behind NAT). A server on loopback is a local swarm:
    nobody outside could dial it anyway, so no check and no relay reservation."""
    from services.common.p2p_relay import trusted_relays

    if options.host in LOOPBACK_HOSTS or not options.initial_peers:
        return dict(reachable_via_relay=False, use_relay=True, use_auto_relay=False)
    return dict(reachable_via_relay=None, use_relay=True, use_auto_relay=True,
                trusted_relays=trusted_relays(options.initial_peers))


def petals_server_kwargs(options: ServerOptions) -> dict:
    """Keyword arguments for ``petals.server.server.Server`` (pure)."""
    from petals.utils.convert_block import QuantType

    if options.blocks is None and not options.num_blocks and options.device == "cpu":
        raise ValueError("give either a block span or a number of blocks to serve")
    kwargs = dict(
        initial_peers=list(options.initial_peers),
        dht_prefix=dht_prefix_for(options.model_id),
        converted_model_name_or_path=options.model_path,
        public_name=options.public_name,
        throughput=float(options.throughput),
        num_handlers=options.num_handlers,
        torch_dtype=options.torch_dtype,
        device=options.device,
        quant_type=QuantType.NONE if options.device == "cpu" else None,
        host_maddrs=[f"/ip4/{options.host}/tcp/{options.port}"],
        announce_maddrs=[f"/ip4/{options.announce_host}/tcp/{options.port}"] if options.announce_host else None,
        update_period=options.update_period,
        request_timeout=options.request_timeout,
        skip_reachability_check=True,  # no health.petals.dev
        mean_block_selection_delay=0.5,
        **relay_kwargs(options),
    )
    if options.batching:
        kwargs["prefetch_batches"] = 0  # the batching pool must see every waiting step at once (batching.py)
    if options.inference_max_length:
        kwargs["inference_max_length"] = options.inference_max_length
    if options.attn_cache_tokens:
        kwargs["attn_cache_tokens"] = options.attn_cache_tokens
    if options.blocks is not None:
        kwargs["block_indices"] = str(options.blocks)
    elif options.num_blocks:
        kwargs["num_blocks"] = options.num_blocks
    # else (GPU, auto): Petals fills the GPU's memory with as many blocks as fit
    if options.identity_path:
        Path(options.identity_path).parent.mkdir(parents=True, exist_ok=True)
        kwargs["identity_path"] = options.identity_path
    kwargs.update(options.extra)
    return kwargs


def fitting_num_blocks(model_path: str, *, torch_dtype: str, memory_limit_bytes: float,
                       cache_tokens: int = 4096, packed_copies: bool = False) -> int:
    """How many blocks (weights + attention cache) fit in ``memory_limit_bytes``, at least 1, at most all.
    ``packed_copies``: the batched decode keeps a oneDNN-packed copy of each block's projections (float32 on CPU,
    node_server/batching.py), so the weights count twice."""
    import torch
    from petals.server.block_utils import get_block_size
    from petals.utils.auto_config import AutoDistributedConfig
    from petals.utils.convert_block import QuantType
    from petals.utils.misc import get_size_in_bytes

    config = AutoDistributedConfig.from_pretrained(model_path)
    dtype = getattr(torch, torch_dtype)
    block_bytes = get_block_size(config, "memory", dtype=dtype, quant_type=QuantType.NONE)
    cache_bytes = 2 * config.hidden_size * cache_tokens * get_size_in_bytes(dtype) // getattr(
        config, "num_key_value_groups", 1)
    fitting = math.floor(0.9 * memory_limit_bytes / (block_bytes * (2 if packed_copies else 1) + cache_bytes))
    return max(1, min(config.num_hidden_layers, fitting))


def _resolve_auto_num_blocks(options: ServerOptions) -> ServerOptions:
    """CPU auto span with no count: fit the memory limit (default: half the RAM). Petals sizes GPUs itself."""
    if options.blocks is not None or options.num_blocks:
        return options
    if options.device != "cpu" and options.memory_limit_gb is None:
        return options
    import psutil

    limit = (options.memory_limit_gb * 1024**3 if options.memory_limit_gb else psutil.virtual_memory().total / 2)
    import torch

    from services.common import packed_linear

    # the batched decode keeps packed copies of the blocks' projections (node_server/batching.py)
    packed = options.batching and packed_linear.packs(getattr(torch, options.torch_dtype), options.device)
    count = fitting_num_blocks(options.model_path, torch_dtype=options.torch_dtype, memory_limit_bytes=limit,
                               packed_copies=packed)
    return dataclasses.replace(options, num_blocks=count)


def _resolve_batching(options: ServerOptions) -> ServerOptions:
    """Batching asked for and not switched off by ``FAR_MESH_DISABLE_COMPAT_FIX=batching``."""
    from services.common.features import feature_enabled

    return dataclasses.replace(options, batching=options.batching and feature_enabled("batching"))


def resolve_server_options(options: ServerOptions) -> ServerOptions:
    """The options a server runs with: batching as the environment allows, the automatic block count, the context."""
    return _resolve_context(_resolve_auto_num_blocks(_resolve_batching(options)))


def _resolve_context(options: ServerOptions) -> ServerOptions:
    """Follow the model's context: the coordinator admits prompt + max_tokens up to ``max_position_embeddings``,
    so every server must accept sessions that long (Petals' own default is 2048 for most models) and keep room
    in its attention cache for at least one of them."""
    if options.inference_max_length:
        return options
    from petals.utils.auto_config import AutoDistributedConfig

    config = AutoDistributedConfig.from_pretrained(options.model_path)
    context = int(config.max_position_embeddings)
    petals_default_cache = 16384 if getattr(config, "num_key_value_groups", 1) > 1 else 4096
    return dataclasses.replace(options, inference_max_length=context,
                               attn_cache_tokens=options.attn_cache_tokens or max(context, petals_default_cache))


class StatusWriter(threading.Thread):
    """Writes what this server announces (and its device memory) to a JSON file every ``period`` seconds."""

    def __init__(self, path: Path, options: ServerOptions, period: float = 1.0):
        super().__init__(name="far-node-status", daemon=True)
        self.path, self.options, self.period = Path(path), options, period
        self.server = None
        self.stopped = threading.Event()
        self.hardware = _device_hardware(options.device)
        self.batching = False

    def snapshot(self, state: Optional[str] = None) -> dict:
        info = getattr(self.server, "server_info", None)
        data = {
            "pid": os.getpid(),
            "time": time.time(),
            "state": state or (info.state.name if info is not None else "STARTING"),
            "start_block": getattr(info, "start_block", None),
            "end_block": getattr(info, "end_block", None),
            "num_blocks_total": getattr(getattr(self.server, "block_config", None), "num_hidden_layers", None),
            **self.hardware,
        }
        data.update(_device_usage(self.options.device))
        if self.batching:
            from node_server.batching import STATS

            data["batching"] = STATS.snapshot()
        return data

    def write(self, state: Optional[str] = None) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.snapshot(state)))
        os.replace(tmp, self.path)

    def run(self) -> None:
        while not self.stopped.wait(self.period):
            try:
                self.write()
            except Exception:  # a status file is best effort; never take the server down for it
                pass


def _device_hardware(device: str) -> dict:
    if not device.startswith("cuda"):
        return {"device": device, "gpu": None, "vram_total_gb": None}
    import torch

    index = torch.device(device).index or 0
    props = torch.cuda.get_device_properties(index)
    return {"device": f"cuda:{index}", "gpu": props.name, "vram_total_gb": props.total_memory / 1024**3}


def _device_usage(device: str) -> dict:
    if not device.startswith("cuda"):
        return {}
    from node_server.hardware import gpu_stats
    import torch

    index = torch.device(device).index or 0
    stats = gpu_stats(index)  # NVML: whole-GPU use and temperature
    if not stats:
        stats = {"vram_used_gb": torch.cuda.memory_reserved(index) / 1024**3}
    return stats


_KEEP_ALIVE: list = []


def run_petals_server(options: ServerOptions, status_file: Optional[Path] = None) -> None:
    """Serve until SIGINT/SIGTERM, then announce OFFLINE and stop every child process."""
    # measured: with three servers on this 2-core box, one compute thread each is fastest (docs/provider.md)
    os.environ.setdefault("OMP_NUM_THREADS", str(options.torch_threads))
    from services.common import petals_adapter  # noqa: F401

    import torch
    from petals.server.server import Server

    torch.set_num_threads(options.torch_threads)
    main_pid = os.getpid()

    def on_signal(signum, _frame):
        if os.getpid() != main_pid:  # a forked child inherited this handler: behave as the default would
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    writer = StatusWriter(status_file, options) if status_file else None
    server = None
    try:
        if writer is not None:
            writer.write("STARTING")
        options = resolve_server_options(options)
        if options.batching:
            from node_server import batching

            batching.install(max_sessions=options.batch_max_sessions,
                             prefill_chunk_tokens=options.prefill_chunk_tokens,
                             batch_wait_ms=options.batch_wait_ms)
            if writer is not None:
                writer.batching = True
        if options.device.startswith("cuda") and options.memory_limit_gb:
            index = torch.device(options.device).index or 0
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, options.memory_limit_gb * 1024**3 / total), index)
        from services.models.hub import hub_errors_explained

        from services.common import p2p_relay

        p2p_relay.install()  # bounds on the relay service it offers; static relays for its own reservation
        with hub_errors_explained(options.model_path):  # a hub model: one clear line if the hub is unreachable
            server = Server(**petals_server_kwargs(options))
        if writer is not None:
            writer.server = server
            writer.start()
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if writer is not None:
            writer.stopped.set()
        if server is not None:
            server.shutdown()
            # Never let the server be garbage-collected: destroying its torch objects aborts the process
            # ("terminate called after throwing std::system_error: Broken pipe"). ``main`` exits with _exit.
            _KEEP_ALIVE.append(server)
        if writer is not None:
            try:
                writer.write("OFFLINE")
            except Exception:
                pass
        reap_children()


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Petals server child of `far-node run` (not for direct use).")
    parser.add_argument("--options", required=True, type=Path, help="JSON file of ServerOptions")
    parser.add_argument("--status-file", type=Path, default=None)
    args = parser.parse_args(argv)
    from services.models.catalog import ModelUnavailable

    try:
        run_petals_server(ServerOptions.from_json(args.options.read_text()), args.status_file)
    except ModelUnavailable as error:
        print(f"far-node: {error}", file=sys.stderr, flush=True)
        os._exit(2)
    # Everything is shut down and reaped; skip interpreter teardown, where torch's threads abort with
    # "terminate called after throwing std::system_error: Broken pipe" (SIGABRT) or hang (docs/provider.md),
    # which would look like a crash to the supervisor.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

"""Run a Petals server for a span of a model's blocks, with the flags this stack needs.

``ServerOptions`` is the typed description of one server; :func:`petals_server_kwargs` turns it into
``petals.server.server.Server`` keyword arguments (pure, tested without a network). The flags that are always
set follow ../shared/SPEC.md "Petals on this stack": explicit initial peers, a numeric throughput (no
benchmark at start), explicit host multiaddrs, an explicit DHT prefix, float32 without quantization on CPU,
no relays, no reachability probe, no UPnP.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

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
    inference_max_length: int = 2048
    update_period: float = 15.0
    request_timeout: float = 180.0
    extra: dict = field(default_factory=dict)


def petals_server_kwargs(options: ServerOptions) -> dict:
    """Keyword arguments for ``petals.server.server.Server`` (pure)."""
    from petals.utils.convert_block import QuantType

    if options.blocks is None and not options.num_blocks:
        raise ValueError("give either a block span or a number of blocks to serve")
    kwargs = dict(
        initial_peers=list(options.initial_peers),
        dht_prefix=dht_prefix_for(options.model_id),
        converted_model_name_or_path=options.model_path,
        public_name=options.public_name,
        throughput=float(options.throughput),
        num_handlers=options.num_handlers,
        inference_max_length=options.inference_max_length,
        torch_dtype=options.torch_dtype,
        device=options.device,
        quant_type=QuantType.NONE if options.device == "cpu" else None,
        host_maddrs=[f"/ip4/{options.host}/tcp/{options.port}"],
        announce_maddrs=[f"/ip4/{options.announce_host}/tcp/{options.port}"] if options.announce_host else None,
        update_period=options.update_period,
        request_timeout=options.request_timeout,
        skip_reachability_check=True,
        reachable_via_relay=False,
        use_relay=False,
        use_auto_relay=False,
        mean_block_selection_delay=0.5,
    )
    if options.blocks is not None:
        kwargs["block_indices"] = str(options.blocks)
    else:
        kwargs["num_blocks"] = options.num_blocks
    if options.identity_path:
        Path(options.identity_path).parent.mkdir(parents=True, exist_ok=True)
        kwargs["identity_path"] = options.identity_path
    kwargs.update(options.extra)
    return kwargs


def run_petals_server(options: ServerOptions) -> None:
    """Serve until SIGINT/SIGTERM, then announce OFFLINE and stop every child process."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # measured: a single compute thread per server is fastest here
    from services.common import petals_compat  # noqa: F401

    import torch
    from petals.server.server import Server

    torch.set_num_threads(1)
    main_pid = os.getpid()

    def on_signal(signum, _frame):
        if os.getpid() != main_pid:  # a forked child inherited this handler: behave as the default would
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    server = Server(**petals_server_kwargs(options))
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        server.shutdown()
        _reap_children()


def _reap_children(timeout: float = 5.0) -> None:
    """Last line of defence against orphans: terminate, then kill, any child left behind."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass

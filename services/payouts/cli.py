"""Command line of the payment tracker.

* ``far-mesh payouts run-once [--dry-run] [--network local|testnet|mainnet] [--cutoff ISO]``
* ``far-mesh payouts serve [--host 127.0.0.1] [--port 8300] [--network ...]``
* ``far-mesh payouts status``
* ``far-mesh chain deploy --network local|testnet`` and ``far-mesh chain devnode``
* ``far-mesh audit`` (``audit`` is a plain function, registered as a top-level command by services/cli.py)

Exit codes: 0 ok, 1 a batch failed / audit found problems / work left open, 2 configuration error,
3 another tracker holds the lock.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from services.common.money import format_far  # light: the CLI imports the heavy parts lazily

app = typer.Typer(help="Weekly FAR payouts on BNB Smart Chain.", no_args_is_help=True, add_completion=False)
chain_app = typer.Typer(help="Deploy and inspect the FAR contracts.", no_args_is_help=True, add_completion=False)

console = Console(width=None if sys.stdout.isatty() else 200)  # piped output: whole wallets and hashes


def _table(title: str, *columns: str) -> Table:
    """A table whose cells wrap instead of being cut with an ellipsis (wallets and hashes must stay whole)."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


class Network(str, Enum):
    local = "local"
    testnet = "testnet"
    mainnet = "mainnet"


class DeployNetwork(str, Enum):
    local = "local"
    testnet = "testnet"


def _settings():
    from services.common.config import PayoutSettings, get_settings
    from services.common.logs import configure_logging

    settings = get_settings(PayoutSettings)
    configure_logging(settings.LOG_LEVEL)
    return settings


def _config_error(error: Exception) -> typer.Exit:
    typer.echo(f"far-mesh: configuration error: {error}", err=True)
    return typer.Exit(2)


def _run(coroutine):
    """asyncio.run with one readable line (not a traceback) for database problems."""
    import asyncpg

    try:
        return asyncio.run(coroutine)
    except asyncpg.UndefinedTableError as error:
        typer.echo(f"far-mesh: database is not migrated ({error}); run `far-mesh db migrate`", err=True)
    except (asyncpg.PostgresError, OSError) as error:
        typer.echo(f"far-mesh: POSTGRES_URL: {type(error).__name__}: {error}", err=True)
    raise typer.Exit(1)


def _run_once(coroutine, stops: type[Exception], command: str):
    """The report of one pass of a money process (payouts, deposits); exit 1 with one line when it had to stop
    (``stops``), 3 when another process held its lock (``report.skipped``)."""
    try:
        report = _run(coroutine)
    except stops as error:
        typer.echo(f"far-mesh {command}: {error}", err=True)
        raise typer.Exit(1) from None
    if report.skipped:
        typer.echo(f"far-mesh {command}: skipped: {report.skipped}", err=True)
        raise typer.Exit(3)
    return report


def _parse_cutoff(value: Optional[str]) -> Optional[datetime]:
    if not value:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def print_plan(plan, *, title: str) -> None:
    from services.payouts.planner import rows_for_table

    table = _table(title, "batch", "wallet", "amount (FAR)", "sessions")
    for index, wallet, amount, sessions in rows_for_table(plan):
        table.add_row(str(index), wallet, amount, str(sessions))
    console.print(table)
    console.print(f"cutoff {plan.cutoff.isoformat() if plan.cutoff else '-'}: {plan.recipient_count} wallets, "
                  f"{format_far(plan.total_far)} FAR in {len(plan.batches)} batch(es); {len(plan.carried_over)} wallets "
                  f"below the {format_far(plan.min_payout_far)} FAR minimum carry over {format_far(plan.carried_over_far)} FAR")


def print_batches(batches) -> None:
    table = _table("batches", "batch", "state", "recipients", "total (FAR)", "tx hash", "block", "note")
    for batch in batches:
        note = ("resumed " if batch.resumed else "") + (batch.error or "")
        table.add_row(str(batch.batch_number), batch.state, str(batch.recipient_count), format_far(batch.total_far),
                      batch.tx_hash or "-", str(batch.block_number or "-"), note.strip())
    console.print(table)


@app.command("run-once")
def run_once(
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan; change nothing in the database or chain"),
    network: Optional[Network] = typer.Option(None, help="default: BSC_NETWORK"),
    cutoff: Optional[str] = typer.Option(None, help="ISO time; contributions finalized before it (default: now)"),
) -> None:
    """Resume unfinished batches, then plan and pay this week's batches (once)."""
    from services.payouts.chain import ChainConfigError, connect
    from services.payouts.executor import PayoutError, PayoutExecutor

    settings = _settings()
    net = network.value if network else settings.BSC_NETWORK
    try:
        chain = None if dry_run else connect(settings, net)
    except ChainConfigError as error:
        raise _config_error(error) from None
    executor = PayoutExecutor.from_settings(settings, chain, network=net)
    report = _run_once(executor.run_once(dry_run=dry_run, cutoff=_parse_cutoff(cutoff)), PayoutError, "payouts")
    if dry_run:
        for row in report.open_batches:
            console.print(f"would resume batch {row['batch_number']} ({row['state']}, {row['recipient_count']} "
                          f"recipients, {format_far(row['total_far'])} FAR, network {row['network']})")
        print_plan(report.plan, title=f"payout plan (dry run, {net})")
        return
    if report.plan is not None:
        print_plan(report.plan, title=f"payout plan ({net})")
    if report.batches:
        print_batches(report.batches)
    for error in report.errors:
        typer.echo(f"far-mesh payouts: {error}", err=True)
    console.print(f"paid {format_far(report.paid_far)} FAR in {sum(b.state == 'confirmed' for b in report.batches)} "
                  f"confirmed batch(es)")
    if not report.ok:
        raise typer.Exit(1)


@app.command("serve")
def serve(
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8300),
    network: Optional[Network] = typer.Option(None, help="default: BSC_NETWORK"),
) -> None:
    """Run the weekly scheduler (Monday 00:00 UTC) with /healthz, /readyz and /metrics."""
    from services.payouts.server import serve as run_server

    settings = _settings()
    run_server(settings, network=network.value if network else settings.BSC_NETWORK, host=host, port=port)


@app.command("status")
def status(limit: int = typer.Option(20, help="how many recent batches")) -> None:
    """Show the most recent batches."""
    import asyncpg

    settings = _settings()

    async def fetch():
        conn = await asyncpg.connect(settings.POSTGRES_URL)
        try:
            return await conn.fetch("SELECT batch_number, network, state, recipient_count, total_far, tx_hash, "
                                    "block_number, error, created_at FROM far_payment_batches "
                                    "ORDER BY batch_number DESC LIMIT $1", limit)
        finally:
            await conn.close()

    table = _table("payout batches", "batch", "network", "state", "recipients", "total (FAR)", "tx hash", "block",
                   "created", "error")
    for row in _run(fetch()):
        table.add_row(str(row["batch_number"]), row["network"], row["state"], str(row["recipient_count"]),
                      format_far(row["total_far"]), row["tx_hash"] or "-", str(row["block_number"] or "-"),
                      row["created_at"].isoformat(timespec="seconds"), row["error"] or "")
    console.print(table)


# ---------------------------------------------------------------------------------------------- chain


@chain_app.command("deploy")
def deploy(
    network: DeployNetwork = typer.Option(DeployNetwork.local),
    treasury: Optional[str] = typer.Option(None, help="address holding the FAR (default: the payer account)"),
    token: Optional[str] = typer.Option(None, help="use this existing FAR token instead of deploying FarToken"),
) -> None:
    """Deploy FarToken (unless --token) and FarPayout; print the addresses to put in the environment."""
    from services.payouts.chain import ChainConfigError, connect, deploy_contracts, record_local_deployment

    settings = _settings()
    try:
        chain = connect(settings, network.value, require_contracts=False)
    except ChainConfigError as error:
        raise _config_error(error) from None
    addresses = deploy_contracts(chain, treasury=treasury, token_address=token)
    for key in ("FAR_TOKEN_ADDRESS", "PAYOUT_CONTRACT_ADDRESS", "DEPOSIT_CONTRACT_ADDRESS"):
        typer.echo(f"{key}={addresses[key]}")
    typer.echo(f"# treasury {addresses['treasury']}, payer {chain.address}, chain id {chain.chain_id}, "
               f"block {addresses['block']}")
    if chain.in_process:
        typer.echo("# note: in-process chain (no BSC_RPC_URL): it ends with this command; "
                   "run `far-mesh chain devnode` for a persistent local chain", err=True)
    elif network.value == "local":
        path = record_local_deployment(settings, chain, settings.BSC_RPC_URL, addresses)
        typer.echo(f"# recorded in {path} (used by --network local when the addresses are not set)")
    elif treasury and treasury.lower() != chain.address.lower():
        typer.echo(f"# the treasury must approve {addresses['PAYOUT_CONTRACT_ADDRESS']} on the token", err=True)


def anvil_binary() -> Path:
    from services.common.config import PROJECT_ROOT

    contracts = PROJECT_ROOT / "contracts"
    binary = contracts / "node_modules" / ".bin" / "anvil"
    if not binary.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise FileNotFoundError("npm not found (needed for anvil from npm @foundry-rs/anvil-linux-amd64)")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=contracts, check=True)
    return binary


@chain_app.command("devnode")
def devnode(
    port: int = typer.Option(8545),
    state_file: Optional[Path] = typer.Option(None, help="chain state kept across restarts "
                                                         "(default: <state dir>/anvil-state.json)"),
    block_time: Optional[int] = typer.Option(None, help="seconds per block (default: mine on each transaction)"),
) -> None:
    """Run a persistent local chain (anvil, npm @foundry-rs/anvil-linux-amd64) on 127.0.0.1 for --network local."""
    settings = _settings()
    state_file = state_file or Path(settings.FAR_MESH_STATE_DIR) / "anvil-state.json"
    state_file.parent.mkdir(parents=True, exist_ok=True)
    args = [str(anvil_binary()), "--host", "127.0.0.1", "--port", str(port), "--state", str(state_file),
            "--chain-id", "31337"]
    if block_time:
        args += ["--block-time", str(block_time)]
    typer.echo(f"BSC_RPC_URL=http://127.0.0.1:{port}  (state {state_file})", err=True)
    os.execv(args[0], args)


# ---------------------------------------------------------------------------------------------- audit


def audit(
    network: Optional[Network] = typer.Option(None, help="default: BSC_NETWORK"),
    from_block: Optional[int] = typer.Option(None, help="scan BatchPaid events from this block"),
    scan_logs: bool = typer.Option(True, help="scan the contract's BatchPaid events for unknown payments"),
    chain_checks: bool = typer.Option(True, "--chain/--no-chain", help="also compare with the chain"),
    accounts: bool = typer.Option(True, "--accounts/--no-accounts",
                                  help="also check the accounts' books (credits = available + reserved + charged) and "
                                       "the deposits against the chain"),
) -> None:
    """Check the money: conservation per session, one confirmed batch per paid contribution, items = on-chain
    transfers; accounts' credits = available + reserved + charged; deposits = the chain's Deposit events."""
    from services.payouts.audit import run_audit
    from services.payouts.chain import ChainConfigError, connect

    settings = _settings()
    net = network.value if network else settings.BSC_NETWORK
    chain = None
    if chain_checks:
        if net == "local" and not settings.BSC_RPC_URL:
            typer.echo("far-mesh audit: network local without BSC_RPC_URL is an in-process chain with no history; "
                       "chain checks skipped", err=True)
        else:
            try:
                chain = connect(settings, net)
            except ChainConfigError as error:
                raise _config_error(error) from None
    report = _run(run_audit(settings.POSTGRES_URL, chain, scan_logs=scan_logs, from_block=from_block,
                            accounts=accounts, deposit_start_block=settings.DEPOSIT_START_BLOCK))
    for check in report.checks:
        mark = "[green]ok[/green]" if check.ok else "[red]FAIL[/red]"
        console.print(f"{mark}  {check.name} ({check.checked} checked)")
        for note in check.notes:
            console.print(f"      note: {note}")
        for problem in check.problems:
            console.print(f"      problem: {problem}")
    if not report.ok:
        raise typer.Exit(1)


audit_app = typer.Typer(add_completion=False)
audit_app.command("audit")(audit)


if __name__ == "__main__":  # python -m services.payouts.cli payouts|chain|audit ...
    root = typer.Typer(add_completion=False, no_args_is_help=True)
    root.add_typer(app, name="payouts")
    root.add_typer(chain_app, name="chain")
    root.command("audit")(audit)
    root(prog_name="far-mesh", args=sys.argv[1:])

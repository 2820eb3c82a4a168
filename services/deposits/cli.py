"""``far-mesh deposits run-once|watch|ref``: credit final on-chain deposits to prepaid accounts.

Exit codes: 0 ok, 1 the watcher must stop (a reorg deeper than the confirmations, or a chain/database error),
2 configuration error, 3 another watcher holds the lock.
"""

from __future__ import annotations

import asyncio
from typing import Optional

import typer

from services.common.money import format_far
from services.payouts.cli import Network, _config_error, _run_once, _settings, console

app = typer.Typer(help="Credit on-chain FAR deposits (FarDeposit) to prepaid accounts.", no_args_is_help=True,
                  add_completion=False)


def _watcher(network: Optional[Network]):
    from services.deposits.watcher import DepositError, DepositWatcher
    from services.payouts.chain import ChainConfigError, connect

    settings = _settings()
    net = network.value if network else settings.BSC_NETWORK
    try:
        chain = connect(settings, net)
        return DepositWatcher.from_settings(settings, chain), settings
    except (ChainConfigError, DepositError) as error:
        raise _config_error(error) from None


@app.command("run-once")
def run_once(network: Optional[Network] = typer.Option(None, help="default: BSC_NETWORK")) -> None:
    """Scan the final blocks once and credit every new Deposit event to its account."""
    from services.deposits.watcher import DepositError

    watcher, _ = _watcher(network)
    report = _run_once(watcher.run_once(), DepositError, "deposits")
    for credit in report.credited:
        console.print(f"credited {format_far(credit.amount_far)} FAR to {credit.account_id} "
                      f"({credit.tx_hash}:{credit.log_index})")
    for credit in report.unmatched:
        console.print(f"[yellow]unmatched[/yellow] {format_far(credit.amount_far)} FAR ({credit.tx_hash}:"
                      f"{credit.log_index}): its accountRef names no account")
    span = f"blocks {report.from_block}..{report.to_block}" if report.to_block is not None else "no new final blocks"
    console.print(f"{span} (final up to {report.safe_head}): {len(report.credited)} credited "
                  f"({format_far(report.credited_far)} FAR), {len(report.unmatched)} unmatched")


@app.command("watch")
def watch(network: Optional[Network] = typer.Option(None, help="default: BSC_NETWORK"),
          interval: Optional[float] = typer.Option(None, help="seconds between scans (DEPOSIT_POLL_INTERVAL_S)")) -> None:
    """Scan for deposits forever (Ctrl-C to stop). `far-mesh payouts serve` runs the same loop in its process."""
    watcher, settings = _watcher(network)
    try:
        asyncio.run(watcher.watch(interval or settings.DEPOSIT_POLL_INTERVAL_S))
    except KeyboardInterrupt:
        pass


@app.command("ref")
def ref(account_id: str = typer.Argument(..., help="account UUID")) -> None:
    """Print the bytes32 accountRef to pass to FarDeposit.deposit for an account."""
    from services.deposits.watcher import account_ref

    typer.echo(account_ref(account_id))

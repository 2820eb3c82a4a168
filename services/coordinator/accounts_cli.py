"""``far-mesh keys create|list|revoke`` and ``far-mesh accounts create|credit|show``."""

from __future__ import annotations

from decimal import Decimal
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from services.common.money import format_far, parse_far
from services.coordinator.accounts import AccountStore
from services.coordinator.cli_support import run_with_store

keys_app = typer.Typer(help="API keys (fl_...).", no_args_is_help=True)
accounts_app = typer.Typer(help="Prepaid accounts.", no_args_is_help=True)
console = Console(highlight=False)


def _with_store(fn):
    return run_with_store(AccountStore, fn)


def _amount(text: str) -> Decimal:
    try:
        return parse_far(text)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


@accounts_app.command("create")
def create_account(name: str = typer.Argument(...), balance: str = typer.Option("0", help="initial FAR")) -> None:
    """Create a prepaid account; prints its id."""
    amount = Decimal(balance) if balance == "0" else _amount(balance)
    account_id = _with_store(lambda store: store.create_account(name, amount))
    typer.echo(account_id)


@accounts_app.command("credit")
def credit(account_id: str = typer.Argument(...), amount: str = typer.Argument(..., help="FAR to add")) -> None:
    """Add prepaid FAR to an account."""
    value = _amount(amount)
    try:
        balance = _with_store(lambda store: store.credit(account_id, value))
    except (LookupError, ValueError) as error:
        typer.echo(f"far-mesh accounts credit: {error}", err=True)
        raise typer.Exit(1)
    typer.echo(f"balance of {account_id}: {format_far(balance)} FAR")


@keys_app.command("create")
def create_key(
    account_id: Optional[str] = typer.Option(None, help="existing account (default: create one)"),
    name: str = typer.Option("default", help="a label for the key"),
    rate_limit: int = typer.Option(600, min=1, help="requests per minute"),
    credit_far: Optional[str] = typer.Option(None, "--credit", help="FAR to credit to the account"),
) -> None:
    """Create an API key (printed once; only its hash is stored)."""

    async def run(store: AccountStore):
        acct = account_id or await store.create_account(name)
        if credit_far:
            await store.credit(acct, _amount(credit_far))
        key_id, key = await store.create_key(acct, name=name, rate_limit_per_minute=rate_limit)
        return acct, key_id, key

    acct, key_id, key = _with_store(run)
    console.print(f"account {acct}\nkey id  {key_id}")
    typer.echo(key)


@keys_app.command("list")
def list_keys(account_id: Optional[str] = typer.Option(None)) -> None:
    """List keys (prefix, account, balance, state)."""
    rows = _with_store(lambda store: store.list_keys(account_id))
    table = Table()
    for column in ("key id", "prefix", "account", "name", "rate/min", "balance FAR", "reserved FAR", "state"):
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["key_id"]), row["key_prefix"] + "…", row["account"], row["name"] or "",
                      str(row["rate_limit_per_minute"]), format_far(row["balance_far"]),
                      format_far(row["reserved_far"]), "revoked" if row["revoked_at"] else "active")
    console.print(table)


@keys_app.command("revoke")
def revoke_key(key_id: str = typer.Argument(...)) -> None:
    """Revoke a key (takes effect on the next request)."""
    if not _with_store(lambda store: store.revoke_key(key_id)):
        typer.echo(f"far-mesh keys revoke: no active key {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")

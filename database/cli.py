"""``far-mesh db ...``: database migrations."""

from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(help="Database migrations.", no_args_is_help=True, add_completion=False)

URL_HELP = "PostgreSQL URL (default: POSTGRES_URL)"


def _url(url: Optional[str]) -> str:
    if url:
        return url
    from services.common.config import get_settings

    return get_settings().POSTGRES_URL


@app.command("migrate")
def migrate_command(url: Optional[str] = typer.Option(None, "--url", help=URL_HELP)) -> None:
    """Apply pending migrations (safe to run twice, and from two processes at once)."""
    from database.migrate import migrate, redact

    target = _url(url)
    try:
        applied = migrate(target)
    except Exception as error:  # one clear line, not a traceback, for an operator
        typer.echo(f"far-mesh db migrate: {redact(target)}: {type(error).__name__}: {error}", err=True)
        raise typer.Exit(1) from None
    if applied:
        for migration_id in applied:
            typer.echo(f"applied {migration_id}")
        typer.echo(f"{len(applied)} migration(s) applied to {redact(target)}")
    else:
        typer.echo(f"{redact(target)} is up to date (nothing to apply)")


@app.command("status")
def status_command(url: Optional[str] = typer.Option(None, "--url", help=URL_HELP)) -> None:
    """List migrations and whether each is applied; exits 3 when some are pending."""
    from database.migrate import redact, status

    target = _url(url)
    try:
        rows = status(target)
    except Exception as error:
        typer.echo(f"far-mesh db status: {redact(target)}: {type(error).__name__}: {error}", err=True)
        raise typer.Exit(1) from None
    for row in rows:
        typer.echo(f"{'applied' if row.applied else 'PENDING'}  {row.id}")
    if not all(row.applied for row in rows):
        raise typer.Exit(3)


@app.command("break-lock")
def break_lock_command(url: Optional[str] = typer.Option(None, "--url", help=URL_HELP)) -> None:
    """Remove a stale yoyo lock left by a killed migration process."""
    from database.migrate import break_lock, redact

    target = _url(url)
    break_lock(target)
    typer.echo(f"migration lock of {redact(target)} removed")

"""``far-mesh models``: build the catalog's models locally and list them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False)


@app.command("pull")
def pull_command(
    name: str = typer.Argument("smollm2-135m-instruct", help="catalog name (see `far-mesh models list`)"),
    directory: Optional[Path] = typer.Option(None, "--dir", help="where to build it (default: state folder)"),
    force: bool = typer.Option(False, help="rebuild even if a verified build exists"),
) -> None:
    """Build a catalog model as a Hugging Face checkpoint (cached: a second call only verifies it)."""
    from services.models.catalog import CATALOG, ModelUnavailable, find_catalog_model, pull

    model = find_catalog_model(name)
    if model is None:
        typer.echo(f"far-mesh models pull: unknown model {name!r}; known: {', '.join(CATALOG)} "
                   "(hub models need no pull: servers and the coordinator download them)", err=True)
        raise typer.Exit(2)
    try:
        path = pull(model, directory, force=force)
    except ModelUnavailable as error:
        typer.echo(f"far-mesh models pull: {error}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{model.model_id} -> {path}")


@app.command("list")
def list_command(
    directory: Optional[Path] = typer.Option(None, "--dir", help="models folder (default: <state>/models)"),
) -> None:
    """What the catalog offers, what is built here and what each needs."""
    from services.common.config import get_settings
    from services.models.catalog import CATALOG, local_status

    default_id = get_settings().DEFAULT_MODEL_ID
    for model in CATALOG.values():
        marker = " (default)" if model.model_id == default_id else ""
        typer.echo(f"{model.name}{marker}\n  model id  {model.model_id}\n  {model.description}\n"
                   f"  blocks    {model.num_blocks}, context {model.context_length} tokens\n"
                   f"  source    {model.source}\n  needs     {model.needs}\n"
                   f"  status    {local_status(model, directory / model.name if directory else None)}")
    if default_id not in {model.model_id for model in CATALOG.values()}:
        typer.echo(f"{default_id} (default): a Hugging Face hub model, downloaded by each server and the "
                   "coordinator on first start")

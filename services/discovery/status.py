"""``far-mesh status``: the swarm coverage report of discovery, for operators. Exit 0 ready, 3 not ready,
1 when discovery cannot be asked (unreachable, unknown model)."""

from __future__ import annotations

import time
from typing import Optional

import httpx
from rich.console import Console
from rich.table import Table

from services.common.coverage import format_ranges

EXIT_READY, EXIT_NOT_READY, EXIT_ERROR = 0, 3, 1


class StatusError(Exception):
    pass


def fetch_coverage(url: str, model_id: str, timeout: float = 10.0) -> dict:
    try:
        response = httpx.get(f"{url.rstrip('/')}/models/{model_id}/coverage", timeout=timeout)
    except httpx.HTTPError as error:
        raise StatusError(f"discovery at {url} is not reachable: {error}") from None
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except Exception:  # noqa: BLE001
            message = response.text[:200]
        raise StatusError(f"discovery answered {response.status_code}: {message}")
    return response.json()


def _peer(peer_id: str, names: dict) -> str:
    short = f"{peer_id[:4]}…{peer_id[-6:]}"
    name = names.get(peer_id)
    return f"{name} ({short})" if name else short


def render(coverage: dict, console: Console) -> None:
    names = coverage.get("peer_names") or {}
    expected = coverage["expected_blocks"]
    ready = coverage["swarm_ready"]
    console.print(f"Model: [bold]{coverage['model_id']}[/bold]")
    console.print(f"Expected Blocks: {expected} | Discovered: {coverage['discovered_blocks']}/{expected} | "
                  f"Loaded: {coverage['loaded_blocks']}/{expected} | "
                  f"Swarm Ready: {'[green]YES[/green]' if ready else '[red]NO[/red]'}", highlight=False)
    missing = ", ".join(format_ranges(coverage["missing_blocks"])) or "none"
    loading = ", ".join(format_ranges(coverage["loading_blocks"])) or "none"
    age = coverage.get("observed_age_s")
    seen = f" | DHT read {age:.0f} s ago" if age is not None else " | DHT not read"
    console.print(f"Missing blocks: {missing} | Loading blocks: {loading}{seen}", highlight=False)

    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("Block", justify="right")
    table.add_column("State")
    table.add_column("Loaded (ONLINE)")
    table.add_column("Joining")
    for block in coverage["blocks"]:
        loaded = block["loaded"]
        joining = [p for p in block["discovered"] if p not in loaded]
        state = ("[green]loaded[/green]" if loaded else "[yellow]loading[/yellow]" if joining
                 else "[red]missing[/red]")
        table.add_row(str(block["block"]), state, ", ".join(_peer(p, names) for p in loaded) or "-",
                      ", ".join(_peer(p, names) for p in joining) or "-")
    console.print(table)
    if coverage["blocking"]:
        console.print("Blocking:" if not ready else "Notes:")
        for reason in coverage["blocking"]:
            console.print(f"  - {reason}", highlight=False, markup=False)
    elif ready:
        console.print("Nothing is blocking inference.")
    for peer in coverage.get("unreachable") or ():
        console.print(f"Unreachable: {_peer(peer['peer_id'], names)} is announced but discovery cannot dial it "
                      f"(it serves nobody): {peer.get('error')}", highlight=False, markup=False)
    for peer in coverage.get("relayed") or ():
        console.print(f"Behind NAT: {_peer(peer['peer_id'], names)} reachable: via relay "
                      f"{_peer(peer['via_relay'], names)}",
                      highlight=False, markup=False)


def run_status(*, url: str, model_id: str, watch: bool, interval: float,
               console: Optional[Console] = None) -> int:
    console = console or Console()
    code = EXIT_ERROR
    try:
        while True:
            try:
                coverage = fetch_coverage(url, model_id)
            except StatusError as error:
                if watch and console.is_terminal:
                    console.clear()
                console.print(f"far-mesh status: {error}", style="red", markup=False)
                code = EXIT_ERROR
            else:
                if watch and console.is_terminal:
                    console.clear()
                render(coverage, console)
                code = EXIT_READY if coverage["swarm_ready"] else EXIT_NOT_READY
            if not watch:
                return code
            time.sleep(interval)
            if not console.is_terminal:
                console.print("")
    except KeyboardInterrupt:
        return code

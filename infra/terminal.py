"""The terminal lines of ``make demo`` and ``far-mesh up``: a step, its details, and the mesh's start-up progress."""

from __future__ import annotations

from rich.console import Console

console = Console(highlight=False)


def step(message: str) -> None:
    console.print(f"[bold cyan]==>[/] {message}")


def detail(message: str) -> None:
    console.print(f"    {message}")


def describe_progress(state: dict) -> str:
    """One line of ``LocalMesh.start``'s progress ``state``: blocks, providers, coordinator."""
    return (f"blocks loaded {state['loaded']}/{state['expected']} (announced {state['discovered']}), "
            f"providers registered {state['registered']}/{state['providers']}, "
            f"coordinator {'ready' if state['coordinator'] else 'starting'}")

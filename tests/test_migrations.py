"""Migrations, the money function finalize_session(), views, heartbeat function and CHECK constraints."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path

import asyncpg
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from database.migrate import MIGRATIONS_DIR, migrate, status

BASE = 10**18
ROOT = Path(__file__).resolve().parents[1]


def far(base_units: int) -> Decimal:
    """Integer base units (1e-18 FAR) -> exact Decimal FAR."""
    return Decimal(base_units).scaleb(-18)


def base(amount: Decimal) -> int:
    value = Decimal(amount) * BASE
    assert value == value.to_integral_value(), amount
    return int(value)


def wallet() -> str:
    return "0x" + secrets.token_hex(20)


def expected_split(cost_base: int, bps: int, rows: list[tuple[bool, int]]) -> tuple[list[int], int]:
    """Reference implementation of SPEC "Accounting" in Python integers: (payments_base, fee_base)."""
    total = sum(units for _, units in rows)
    if total == 0:
        return [0] * len(rows), cost_base
    payments = [(cost_base * (10000 - bps) * units) // (10000 * total) if registered else 0 for registered, units in rows]
    return payments, cost_base - sum(payments)


# --------------------------------------------------------------------------------------------- migrations
def test_migrate_applies_in_order_records_and_is_idempotent(make_database):
    url = make_database(migrated=False)
    files = sorted(p.stem for p in MIGRATIONS_DIR.glob("*.sql") if not p.name.endswith(".rollback.sql"))
    assert files and files[0] == "0001_initial"

    assert [s.id for s in status(url)] == files and not any(s.applied for s in status(url))
    applied = migrate(url.replace("postgresql://", "postgres://", 1))  # any spelling of the scheme works
    assert applied == files
    assert all(s.applied for s in status(url))

    with psycopg.connect(url) as conn:
        recorded = [row[0] for row in conn.execute("SELECT migration_id FROM _yoyo_migration ORDER BY applied_at_utc")]
        assert recorded == files
        tables = {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"far_nodes", "far_accounts", "far_api_keys", "far_mesh_sessions", "far_session_contributions",
                "far_payment_batches", "far_payment_batch_items"} <= tables
        views = {row[0] for row in conn.execute("SELECT viewname FROM pg_views WHERE schemaname = 'public'")}
        assert {"active_far_nodes", "node_earnings_summary"} <= views

    assert migrate(url) == []
    assert migrate(url.replace("postgresql://", "postgresql+psycopg://", 1)) == []


def test_cli_migrate_and_status(make_database):
    from typer.testing import CliRunner

    from database.cli import app

    url = make_database(migrated=False)
    runner = CliRunner()
    result = runner.invoke(app, ["status", "--url", url])
    assert result.exit_code == 3 and "PENDING  0001_initial" in result.output
    result = runner.invoke(app, ["migrate", "--url", url])
    assert result.exit_code == 0, result.output
    assert "applied 0001_initial" in result.output
    result = runner.invoke(app, ["migrate", "--url", url])
    assert result.exit_code == 0 and "up to date" in result.output
    assert runner.invoke(app, ["status", "--url", url]).exit_code == 0
    bad = runner.invoke(app, ["migrate", "--url", "postgresql://postgres@127.0.0.1:1/nope"])
    assert bad.exit_code == 1 and "far-mesh db migrate" in bad.output


def test_concurrent_migrations_from_two_processes(make_database):
    url = make_database(migrated=False)
    code = "import sys; from database.migrate import migrate; print(','.join(migrate(sys.argv[1])))"
    procs = [subprocess.Popen([sys.executable, "-c", code, url], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    applied = [item for out in outputs for item in out.split(",") if item]
    assert sorted(applied) == sorted(s.id for s in status(url))  # every migration applied exactly once
    assert migrate(url) == []


# --------------------------------------------------------------------------------------------- helpers (asyncpg)
async def add_node(conn, *, state="online", wallet_address=None, model_id="test/model", last_seen_ago_s: float = 0):
    row = await conn.fetchrow(
        """INSERT INTO far_nodes (peer_id, wallet_address, model_id, start_block, end_block, state, last_seen)
           VALUES ($1, $2, $3, 0, 4, $4, now() - make_interval(secs => $5))
           RETURNING node_id, peer_id, wallet_address""",
        "Qm" + secrets.token_hex(16), wallet_address or wallet(), model_id, state, last_seen_ago_s,
    )
    return row


async def add_session(conn, *, price: Decimal, prompt_price: Decimal = Decimal(0), bps: int = 1000) -> uuid.UUID:
    return await conn.fetchval(
        """INSERT INTO far_mesh_sessions (request_id, model_id, price_per_token_far, price_per_prompt_token_far,
                                          platform_fee_bps)
           VALUES ($1, 'test/model', $2, $3, $4) RETURNING session_id""",
        "req_" + secrets.token_hex(8), price, prompt_price, bps,
    )


async def checkpoint(conn, session_id, peer_id, node_id, wallet_address, units: int, blocks: str = "0:4", steps: int = 1):
    """The coordinator's upsert: absolute totals, so a retry never double counts."""
    await conn.execute(
        """INSERT INTO far_session_contributions (session_id, peer_id, node_id, wallet_address, blocks, work_units, steps)
           VALUES ($1, $2, $3, $4, $5, $6, $7)
           ON CONFLICT (session_id, peer_id) DO UPDATE
             SET work_units = excluded.work_units, steps = excluded.steps, blocks = excluded.blocks""",
        session_id, peer_id, node_id, wallet_address, blocks, units, steps,
    )


async def run_case(conn, *, price, prompt_price=Decimal(0), bps, rows, prompt_tokens=0, completion_tokens=0):
    """rows: [(registered, units)]. Returns (session row, [payment_far in row order])."""
    session_id = await add_session(conn, price=price, prompt_price=prompt_price, bps=bps)
    peers = []
    for registered, units in rows:
        if registered:
            node = await add_node(conn)
            peer, node_id, addr = node["peer_id"], node["node_id"], node["wallet_address"]
        else:
            peer, node_id, addr = "Qm" + secrets.token_hex(16), None, None
        await checkpoint(conn, session_id, peer, node_id, addr, units)
        peers.append(peer)
    result = await conn.fetchrow("SELECT * FROM finalize_session($1, 'completed', 'length', $2, $3)",
                                 session_id, prompt_tokens, completion_tokens)
    payments = {r["peer_id"]: r["payment_far"] for r in await conn.fetch(
        "SELECT peer_id, payment_far FROM far_session_contributions WHERE session_id = $1", session_id)}
    return result, [payments[p] for p in peers]


# --------------------------------------------------------------------------------------------- finalize_session
@pytest.mark.parametrize(
    "case",
    [
        # 10 tokens x 0.0001 = 0.001 FAR; 10 % fee; units 3:1 -> 0.000675 / 0.000225, fee 0.0001
        dict(price="0.0001", bps=1000, rows=[(True, 3), (True, 1)], completion=10,
             payments=["0.000675", "0.000225"], cost="0.001", fee="0.0001"),
        # cost = 10 base units, no fee, 3 equal shares -> 3 base units each, 1 unit of dust to the fee
        dict(price="0.00000000000000001", bps=0, rows=[(True, 1), (True, 1), (True, 1)], completion=1,
             payments=["0.000000000000000003"] * 3, cost="0.00000000000000001", fee="0.000000000000000001"),
        # unregistered peer: its share (half of the pool) stays with the platform
        dict(price="1", bps=1000, rows=[(True, 2), (False, 2)], completion=1,
             payments=["0.45", "0"], cost="1", fee="0.55"),
        # bps 10000: everything is fee
        dict(price="0.5", bps=10000, rows=[(True, 5), (True, 7)], completion=4,
             payments=["0", "0"], cost="2", fee="2"),
        # bps 0: everything to providers, rounding down (1/3, 2/3 of 1 FAR)
        dict(price="1", bps=0, rows=[(True, 1), (True, 2)], completion=1,
             payments=["0.333333333333333333", "0.666666666666666666"], cost="1", fee="0.000000000000000001"),
        # total_units = 0: everything is fee
        dict(price="0.0001", bps=1000, rows=[(True, 0), (False, 0)], completion=50,
             payments=["0", "0"], cost="0.005", fee="0.005"),
        # no contributions at all (e.g. failed before the first step)
        dict(price="0.0001", bps=1000, rows=[], completion=3, payments=[], cost="0.0003", fee="0.0003"),
        # prompt tokens priced too: 5 x 0.0001 + 7 x 0.00002 = 0.00064; pool 0.000576 split 1:1
        dict(price="0.0001", prompt_price="0.00002", bps=1000, rows=[(True, 9), (True, 9)], completion=5, prompt=7,
             payments=["0.000288", "0.000288"], cost="0.00064", fee="0.000064"),
        # zero tokens: zero cost, zero payments
        dict(price="0.0001", bps=1000, rows=[(True, 4)], completion=0, payments=["0"], cost="0", fee="0"),
    ],
)
async def test_finalize_session_hand_computed(db_pool, case):
    async with db_pool.acquire() as conn:
        result, payments = await run_case(
            conn, price=Decimal(case["price"]), prompt_price=Decimal(case.get("prompt_price", "0")), bps=case["bps"],
            rows=case["rows"], prompt_tokens=case.get("prompt", 0), completion_tokens=case["completion"],
        )
    assert payments == [Decimal(p) for p in case["payments"]]
    assert result["cost_far"] == Decimal(case["cost"])
    assert result["fee_far"] == Decimal(case["fee"])
    assert result["cost_far"] == result["fee_far"] + sum(payments, Decimal(0))
    assert result["status"] == "completed" and result["finish_reason"] == "length"
    assert result["finalized_at"] is not None
    assert result["completion_tokens"] == case["completion"] and result["prompt_tokens"] == case.get("prompt", 0)


async def test_finalize_is_idempotent(db_pool):
    async with db_pool.acquire() as conn:
        first, payments = await run_case(conn, price=Decimal("0.0001"), bps=1000, rows=[(True, 2), (True, 1)],
                                         completion_tokens=30, prompt_tokens=4)
        session_id = first["session_id"]
        before = await conn.fetch("SELECT * FROM far_session_contributions WHERE session_id = $1 ORDER BY peer_id",
                                  session_id)
        again = await conn.fetchrow("SELECT * FROM finalize_session($1, 'failed', 'other', 999, 999)", session_id)
        assert dict(again) == dict(first)
        after = await conn.fetch("SELECT * FROM far_session_contributions WHERE session_id = $1 ORDER BY peer_id",
                                 session_id)
        assert [dict(r) for r in after] == [dict(r) for r in before]
        stored = await conn.fetchrow("SELECT * FROM far_mesh_sessions WHERE session_id = $1", session_id)
        assert dict(stored) == dict(first)


async def test_checkpoint_upsert_absolute_and_late_checkpoint_dropped(db_pool):
    async with db_pool.acquire() as conn:
        session_id = await add_session(conn, price=Decimal("1"), bps=0)
        node = await add_node(conn)
        for _ in range(3):  # a retried checkpoint with the same totals never double counts
            await checkpoint(conn, session_id, node["peer_id"], node["node_id"], node["wallet_address"], 40)
        await checkpoint(conn, session_id, node["peer_id"], node["node_id"], node["wallet_address"], 64, steps=2)
        assert await conn.fetchval("SELECT work_units FROM far_session_contributions WHERE session_id = $1",
                                   session_id) == 64
        await conn.fetchrow("SELECT * FROM finalize_session($1, 'completed', 'eos', 0, 2)", session_id)
        # late checkpoints after finalization are dropped (the paid record is frozen)
        await checkpoint(conn, session_id, node["peer_id"], node["node_id"], node["wallet_address"], 100, steps=3)
        await checkpoint(conn, session_id, "QmLatePeer" + secrets.token_hex(4), None, None, 10)
        rows = await conn.fetch("SELECT work_units, payment_far FROM far_session_contributions WHERE session_id = $1",
                                session_id)
        assert [(r["work_units"], r["payment_far"]) for r in rows] == [(64, Decimal(2))]
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE far_session_contributions SET payment_far = 5 WHERE session_id = $1", session_id)


async def test_checkpoint_racing_finalize_is_counted_or_dropped(db_pool):
    """A checkpoint in an open transaction makes finalize wait, so finalize sees its final units."""
    async with db_pool.acquire() as writer, db_pool.acquire() as finalizer:
        session_id = await add_session(writer, price=Decimal("1"), bps=0)
        a, b = await add_node(writer), await add_node(writer)
        await checkpoint(writer, session_id, a["peer_id"], a["node_id"], a["wallet_address"], 1)
        await checkpoint(writer, session_id, b["peer_id"], b["node_id"], b["wallet_address"], 1)
        tx = writer.transaction()
        await tx.start()
        await checkpoint(writer, session_id, a["peer_id"], a["node_id"], a["wallet_address"], 3)
        task = asyncio.create_task(finalizer.fetchrow(
            "SELECT * FROM finalize_session($1, 'completed', 'length', 0, 4)", session_id))
        await asyncio.sleep(0.3)
        assert not task.done()  # waiting for the checkpoint's transaction
        await tx.commit()
        result = await asyncio.wait_for(task, 10)
        rows = {r["peer_id"]: r["payment_far"] for r in await writer.fetch(
            "SELECT peer_id, payment_far FROM far_session_contributions WHERE session_id = $1", session_id)}
    assert rows == {a["peer_id"]: Decimal(3), b["peer_id"]: Decimal(1)}
    assert result["fee_far"] == 0 and result["cost_far"] == 4


async def test_finalize_rejects_bad_input(db_pool):
    async with db_pool.acquire() as conn:
        session_id = await add_session(conn, price=Decimal("0.1"))
        with pytest.raises(asyncpg.InvalidParameterValueError):
            await conn.fetchrow("SELECT * FROM finalize_session($1, 'running', NULL, 0, 0)", session_id)
        with pytest.raises(asyncpg.InvalidParameterValueError):
            await conn.fetchrow("SELECT * FROM finalize_session($1, 'completed', NULL, -1, 0)", session_id)
        with pytest.raises(asyncpg.NoDataFoundError):
            await conn.fetchrow("SELECT * FROM finalize_session($1, 'completed', NULL, 0, 0)", uuid.uuid4())
        assert await conn.fetchval("SELECT status FROM far_mesh_sessions WHERE session_id = $1", session_id) == "running"


@pytest.fixture(scope="module")
def sync_conn(postgres_url):
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        yield conn


row_strategy = st.tuples(st.booleans(), st.integers(min_value=0, max_value=10**12))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    price_base=st.one_of(st.integers(0, 10**15), st.integers(0, 10**21)),
    prompt_price_base=st.one_of(st.just(0), st.integers(0, 10**17)),
    completion=st.integers(0, 100_000),
    prompt=st.integers(0, 100_000),
    bps=st.one_of(st.sampled_from([0, 1, 1000, 9999, 10000]), st.integers(0, 10000)),
    rows=st.lists(row_strategy, max_size=8),
)
def test_finalize_random_cases_match_reference(sync_conn, price_base, prompt_price_base, completion, prompt, bps, rows):
    cost_base = completion * price_base + prompt * prompt_price_base
    if cost_base >= 10**38:  # beyond NUMERIC(38,18): not a realistic session
        return
    conn = sync_conn
    session_id = conn.execute(
        """INSERT INTO far_mesh_sessions (request_id, model_id, price_per_token_far, price_per_prompt_token_far,
                                          platform_fee_bps)
           VALUES (%s, 'test/model', %s, %s, %s) RETURNING session_id""",
        ("req_" + secrets.token_hex(8), far(price_base), far(prompt_price_base), bps),
    ).fetchone()[0]
    peers = []
    for i, (registered, units) in enumerate(rows):
        peer = f"QmPeer{i}_{secrets.token_hex(6)}"
        node_id, addr = None, None
        if registered:
            addr = wallet()
            node_id = conn.execute(
                "INSERT INTO far_nodes (peer_id, wallet_address, model_id, start_block, end_block) "
                "VALUES (%s, %s, 'test/model', 0, 2) RETURNING node_id", (peer, addr)).fetchone()[0]
        conn.execute(
            "INSERT INTO far_session_contributions (session_id, peer_id, node_id, wallet_address, blocks, work_units) "
            "VALUES (%s, %s, %s, %s, '0:2', %s)", (session_id, peer, node_id, addr, units))
        peers.append(peer)
    cost, fee = conn.execute(
        "SELECT cost_far, fee_far FROM finalize_session(%s, 'completed', 'length', %s, %s)",
        (session_id, prompt, completion)).fetchone()
    got = dict(conn.execute("SELECT peer_id, payment_far FROM far_session_contributions WHERE session_id = %s",
                            (session_id,)).fetchall())
    expected_payments, expected_fee = expected_split(cost_base, bps, rows)
    assert base(cost) == cost_base
    assert [base(got[p]) for p in peers] == expected_payments
    assert base(fee) == expected_fee
    assert cost == fee + sum((got[p] for p in peers), Decimal(0))
    # the platform keeps at least its fee
    assert expected_fee * 10000 >= cost_base * bps


# --------------------------------------------------------------------------------------------- views & heartbeat
async def test_active_far_nodes_view(db_pool):
    async with db_pool.acquire() as conn:
        fresh = await add_node(conn)
        stale = await add_node(conn, last_seen_ago_s=120)
        offline = await add_node(conn, state="offline")
        gone = await add_node(conn, state="unregistered")
        ids = [n["node_id"] for n in (fresh, stale, offline, gone)]
        active = {r["node_id"] for r in await conn.fetch(
            "SELECT node_id FROM active_far_nodes WHERE node_id = ANY($1::uuid[])", ids)}
        assert active == {fresh["node_id"]}
        # a heartbeat brings the stale node back
        assert await conn.fetchval("SELECT update_node_last_seen($1)", stale["node_id"]) is not None
        active = {r["node_id"] for r in await conn.fetch(
            "SELECT node_id FROM active_far_nodes WHERE node_id = ANY($1::uuid[])", ids)}
        assert active == {fresh["node_id"], stale["node_id"]}


async def test_update_node_last_seen(db_pool):
    async with db_pool.acquire() as conn:
        node = await add_node(conn, state="offline", last_seen_ago_s=500)
        seen = await conn.fetchval("SELECT update_node_last_seen($1, NULL, 1234, 7.5, 61)", node["node_id"])
        row = await conn.fetchrow("SELECT * FROM far_nodes WHERE node_id = $1", node["node_id"])
        assert row["last_seen"] == seen and row["state"] == "online"
        assert (row["tokens_served"], row["vram_used_gb"], row["gpu_temp_c"]) == (1234, Decimal("7.5"), Decimal(61))
        await conn.fetchval("SELECT update_node_last_seen($1, p_state => 'offline')", node["node_id"])
        row = await conn.fetchrow("SELECT * FROM far_nodes WHERE node_id = $1", node["node_id"])
        assert row["state"] == "offline" and row["tokens_served"] == 1234  # NULL leaves values unchanged
        with pytest.raises(asyncpg.InvalidParameterValueError):
            await conn.fetchval("SELECT update_node_last_seen($1, 'unregistered')", node["node_id"])
        gone = await add_node(conn, state="unregistered")
        assert await conn.fetchval("SELECT update_node_last_seen($1)", gone["node_id"]) is None
        assert await conn.fetchval("SELECT state FROM far_nodes WHERE node_id = $1", gone["node_id"]) == "unregistered"
        assert await conn.fetchval("SELECT update_node_last_seen($1)", uuid.uuid4()) is None
        # unregistered_at follows state (trigger): stamped on unregister, cleared on re-registration
        assert await conn.fetchval("SELECT unregistered_at FROM far_nodes WHERE node_id = $1", gone["node_id"])
        await conn.execute("UPDATE far_nodes SET state = 'online' WHERE node_id = $1", gone["node_id"])
        assert await conn.fetchval("SELECT unregistered_at FROM far_nodes WHERE node_id = $1", gone["node_id"]) is None
        await conn.execute("UPDATE far_nodes SET state = 'unregistered' WHERE node_id = $1", node["node_id"])
        assert await conn.fetchval("SELECT unregistered_at FROM far_nodes WHERE node_id = $1", node["node_id"])


async def test_node_earnings_summary_view(db_pool):
    async with db_pool.acquire() as conn:
        node = await add_node(conn)
        idle = await add_node(conn)

        async def finalized_session(units: int, tokens: int):
            session_id = await add_session(conn, price=Decimal("1"), bps=0)
            await checkpoint(conn, session_id, node["peer_id"], node["node_id"], node["wallet_address"], units)
            await conn.fetchrow("SELECT * FROM finalize_session($1, 'completed', 'length', 0, $2)", session_id, tokens)
            return session_id

        unbatched = await finalized_session(10, 1)   # earns 1
        confirmed = await finalized_session(20, 2)   # earns 2, paid
        submitted = await finalized_session(30, 4)   # earns 4, in a batch not yet confirmed
        running = await add_session(conn, price=Decimal("1"), bps=0)  # not finalized: no earnings yet
        await checkpoint(conn, running, node["peer_id"], node["node_id"], node["wallet_address"], 5)

        async def batch(state: str) -> uuid.UUID:
            return await conn.fetchval(
                """INSERT INTO far_payment_batches (network, state, cutoff, total_far, recipient_count, nonce, raw_tx,
                                                    tx_hash, confirmed_at)
                   VALUES ('local', $1, now(), 0, 1, 0, '\\x00'::bytea, $2, CASE WHEN $1 = 'confirmed' THEN now() END)
                   RETURNING batch_id""", state, "0x" + secrets.token_hex(32))

        for session_id, state in ((confirmed, "confirmed"), (submitted, "submitted")):
            await conn.execute("UPDATE far_session_contributions SET payment_batch_id = $1 WHERE session_id = $2",
                               await batch(state), session_id)

        rows = {r["node_id"]: r for r in await conn.fetch(
            "SELECT * FROM node_earnings_summary WHERE node_id = ANY($1::uuid[])", [node["node_id"], idle["node_id"]])}
    assert unbatched
    summary = rows[node["node_id"]]
    assert summary["peer_id"] == node["peer_id"] and summary["wallet_address"] == node["wallet_address"]
    assert summary["sessions"] == 4 and summary["work_units"] == 65
    assert (summary["earned_far"], summary["paid_far"], summary["pending_far"]) == (Decimal(7), Decimal(2), Decimal(5))
    empty = rows[idle["node_id"]]
    assert (empty["sessions"], empty["work_units"], empty["earned_far"], empty["paid_far"], empty["pending_far"]) == (
        0, 0, 0, 0, 0)


# --------------------------------------------------------------------------------------------- constraints
async def test_check_constraints(db_pool):
    async with db_pool.acquire() as conn:
        for bad_wallet in ("0x123", "1x" + "a" * 40, "0x" + "g" * 40, "0x" + "a" * 41):
            with pytest.raises(asyncpg.CheckViolationError):
                await add_node(conn, wallet_address=bad_wallet)
        await add_node(conn, wallet_address="0x" + "aB" * 20)  # mixed-case checksum addresses are fine
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("INSERT INTO far_nodes (peer_id, wallet_address, model_id, start_block, end_block) "
                               "VALUES ('QmX', $1, 'm', 3, 3)", wallet())
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("INSERT INTO far_accounts (name, balance_far) VALUES ('neg', -1)")
        account = await conn.fetchval("INSERT INTO far_accounts (name, balance_far) VALUES ('a', 5) RETURNING account_id")
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE far_accounts SET balance_far = balance_far - 6 WHERE account_id = $1", account)
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE far_accounts SET reserved_far = -0.000000000000000001 WHERE account_id = $1",
                               account)
        with pytest.raises(asyncpg.CheckViolationError):
            await add_session(conn, price=Decimal("0.1"), bps=10001)
        with pytest.raises(asyncpg.CheckViolationError):
            await add_session(conn, price=Decimal("-0.1"))
        session_id = await add_session(conn, price=Decimal("0.1"))
        with pytest.raises(asyncpg.CheckViolationError):  # status and money fields only through finalize_session()
            await conn.execute("UPDATE far_mesh_sessions SET status = 'completed' WHERE session_id = $1", session_id)
        with pytest.raises(asyncpg.CheckViolationError):
            await checkpoint(conn, session_id, "QmBad", None, None, -1)
        with pytest.raises(asyncpg.CheckViolationError):
            await checkpoint(conn, session_id, "QmBad", None, None, 1, blocks="0-2")
        with pytest.raises(asyncpg.CheckViolationError):  # a signed batch must have its raw tx stored
            await conn.execute("INSERT INTO far_payment_batches (network, state, cutoff, total_far, recipient_count) "
                               "VALUES ('local', 'signed', now(), 1, 1)")
        batch_id, number = await conn.fetchrow(
            "INSERT INTO far_payment_batches (network, cutoff, total_far, recipient_count) "
            "VALUES ('local', now(), 1.5, 1) RETURNING batch_id, batch_number")
        assert number >= 1
        with pytest.raises(asyncpg.CheckViolationError):  # amount_base must be amount_far * 10^18
            await conn.execute("INSERT INTO far_payment_batch_items (batch_id, wallet_address, amount_far, amount_base) "
                               "VALUES ($1, $2, 1.5, 15)", batch_id, wallet())
        await conn.execute("INSERT INTO far_payment_batch_items (batch_id, wallet_address, amount_far, amount_base) "
                           "VALUES ($1, $2, 1.5, 1500000000000000000)", batch_id, wallet())


# --------------------------------------------------------------------------------------------- payout guards (0004)
async def test_payout_batch_transitions_and_paid_contributions_are_guarded(db_pool):
    """Trigger far_payment_batches_guard: only planned -> signed -> submitted -> confirmed, confirmed -> submitted (a
    reorg removed the payment before finality) and planned -> failed (a signed batch is sent again with its batchId,
    never failed); failed stays final; the signed transaction never changes; open/paid batches are not deleted. Trigger
    far_contributions_batch_guard: contributions leave a batch only once it is failed (or deleted while planned)."""
    async with db_pool.acquire() as conn:
        node = await add_node(conn)

        async def paid_session() -> uuid.UUID:
            session_id = await add_session(conn, price=Decimal("1"), bps=0)
            await checkpoint(conn, session_id, node["peer_id"], node["node_id"], node["wallet_address"], 1)
            await conn.fetchrow("SELECT * FROM finalize_session($1, 'completed', 'length', 0, 1)", session_id)
            return session_id

        async def planned_batch(session_id) -> uuid.UUID:
            batch_id = await conn.fetchval("INSERT INTO far_payment_batches (network, cutoff, total_far, recipient_count)"
                                           " VALUES ('local', now(), 1, 1) RETURNING batch_id")
            await conn.execute("UPDATE far_session_contributions SET payment_batch_id = $1 WHERE session_id = $2",
                               batch_id, session_id)
            return batch_id

        async def move(batch_id, state: str, **extra) -> None:
            sets = "".join(f", {k} = {v}" for k, v in extra.items())
            await conn.execute(f"UPDATE far_payment_batches SET state = $2{sets} WHERE batch_id = $1", batch_id, state)

        async def attached(session_id):
            return await conn.fetchval("SELECT payment_batch_id FROM far_session_contributions WHERE session_id = $1",
                                       session_id)

        signed = {"raw_tx": "'\\x01'::bytea", "tx_hash": f"'0x{secrets.token_hex(32)}'", "nonce": "7"}
        paid = await paid_session()
        batch = await planned_batch(paid)
        with pytest.raises(asyncpg.CheckViolationError):  # planned -> submitted skips signing
            await move(batch, "submitted", **signed)
        await move(batch, "signed", **signed)
        with pytest.raises(asyncpg.CheckViolationError):  # signed -> planned: never back
            await move(batch, "planned")
        with pytest.raises(asyncpg.CheckViolationError):  # the signed transaction is never replaced
            await conn.execute("UPDATE far_payment_batches SET nonce = 8 WHERE batch_id = $1", batch)
        with pytest.raises(asyncpg.CheckViolationError):  # an open batch keeps its contributions until it fails
            await conn.execute("UPDATE far_session_contributions SET payment_batch_id = NULL WHERE session_id = $1", paid)
        with pytest.raises(asyncpg.CheckViolationError):  # a signed batch never fails (it is sent again)
            await move(batch, "failed")
        await move(batch, "submitted")
        with pytest.raises(asyncpg.CheckViolationError):
            await move(batch, "failed")
        await move(batch, "confirmed", confirmed_at="now()", block_number="12")
        await move(batch, "submitted")  # its payment was removed by a reorg before finality
        await move(batch, "confirmed")
        for state in ("failed", "signed", "planned"):
            with pytest.raises(asyncpg.CheckViolationError):
                await move(batch, state)
        with pytest.raises(asyncpg.CheckViolationError):  # paid contributions are never detached...
            await conn.execute("UPDATE far_session_contributions SET payment_batch_id = NULL WHERE session_id = $1", paid)
        other = await conn.fetchval("INSERT INTO far_payment_batches (network, cutoff, total_far, recipient_count)"
                                    " VALUES ('local', now(), 1, 1) RETURNING batch_id")
        with pytest.raises(asyncpg.CheckViolationError):  # ...nor moved to another batch...
            await conn.execute("UPDATE far_session_contributions SET payment_batch_id = $2 WHERE session_id = $1",
                               paid, other)
        with pytest.raises(asyncpg.CheckViolationError):  # ...nor detached by deleting their batch
            await conn.execute("DELETE FROM far_payment_batches WHERE batch_id = $1", batch)
        assert await attached(paid) == batch
        await conn.execute("UPDATE far_payment_batches SET error = 'note' WHERE batch_id = $1", batch)  # same state: ok

        # A failed batch releases its contributions; a planned one may be deleted (never signed).
        released = await paid_session()
        failing = await planned_batch(released)
        await move(failing, "failed")
        await conn.execute("UPDATE far_session_contributions SET payment_batch_id = NULL WHERE session_id = $1",
                           released)
        with pytest.raises(asyncpg.CheckViolationError):
            await move(failing, "planned")
        dropped = await paid_session()
        await conn.execute("DELETE FROM far_payment_batches WHERE batch_id = $1", await planned_batch(dropped))
        assert await attached(released) is None and await attached(dropped) is None


# --------------------------------------------------------------------------------------------- quarantine lifts (0010)
async def test_quarantine_lifts_are_recorded(db_pool):
    """lift_quarantine() moves a far_quarantine row to far_quarantine_lifts with who and why; it refuses a peer that is
    not quarantined and a lift without a reason or an operator; a bare DELETE is recorded too (as the database user,
    'deleted ... directly'), and a named lift's operator never leaks onto a later DELETE of the same transaction."""
    peer, other = "Qm" + secrets.token_hex(8), "Qm" + secrets.token_hex(8)
    async with db_pool.acquire() as conn:
        for p in (peer, other):
            await conn.execute("INSERT INTO far_quarantine (peer_id, reason, failed_checks) VALUES ($1, 'bad', 2)", p)
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("SELECT lift_quarantine($1, 'ops', ' ')", peer)
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("SELECT lift_quarantine($1, NULL, 'why')", peer)
        with pytest.raises(asyncpg.NoDataFoundError):
            await conn.execute("SELECT lift_quarantine('QmNotQuarantined', 'ops', 'why')")
        async with conn.transaction():
            lift = await conn.fetchrow("SELECT * FROM lift_quarantine($1, 'ops', 'fixed')", peer)
            await conn.execute("DELETE FROM far_quarantine WHERE peer_id = $1", other)
        assert (lift["peer_id"], lift["reason"], lift["failed_checks"], lift["lifted_by"], lift["lift_reason"]) == (
            peer, "bad", 2, "ops", "fixed")
        bare = await conn.fetchrow("SELECT * FROM far_quarantine_lifts WHERE peer_id = $1", other)
        assert bare["lifted_by"] == await conn.fetchval("SELECT session_user::text")
        assert "directly" in bare["lift_reason"] and bare["reason"] == "bad"
        assert not await conn.fetch("SELECT 1 FROM far_quarantine WHERE peer_id = ANY($1::text[])", [peer, other])

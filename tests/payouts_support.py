"""Shared helpers of the payouts tests: seed sessions/contributions, read what each wallet earned and was paid."""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from decimal import Decimal

from eth_utils import to_checksum_address

from services.common.money import to_base_units


def wallet(i: int) -> str:
    """A deterministic, valid, non-zero wallet address (mixed-case checksum)."""
    return to_checksum_address("0x" + (uuid.UUID(int=(0xFA12 << 100) + i * 7919).hex + "00000000")[:40])


async def ensure_node(conn, wallet_address: str, peer_id: str) -> uuid.UUID:
    return await conn.fetchval(
        "INSERT INTO far_nodes (peer_id, wallet_address, model_id, start_block, end_block) "
        "VALUES ($1, $2, 'far-mesh/tiny-llama', 0, 4) "
        "ON CONFLICT (peer_id) DO UPDATE SET wallet_address = EXCLUDED.wallet_address RETURNING node_id",
        peer_id, wallet_address)


async def seed_session(conn, contributions: list[tuple[str | None, int]], *, completion_tokens: int,
                       prompt_tokens: int = 0, price: Decimal = Decimal("0.01"), fee_bps: int = 1000,
                       finalize: bool = True, wallet_case: str = "checksum") -> uuid.UUID:
    """One session with (wallet or None = unregistered peer, work_units) contributions, finalized by SQL."""
    session_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO far_mesh_sessions (session_id, request_id, model_id, price_per_token_far, "
        "price_per_prompt_token_far, platform_fee_bps) VALUES ($1, $2, 'far-mesh/tiny-llama', $3, 0, $4)",
        session_id, f"req-{session_id}", price, fee_bps)
    for index, (wallet_address, units) in enumerate(contributions):
        peer_id = f"peer-{wallet_address or 'anon'}-{index}"
        node_id = await ensure_node(conn, wallet_address, peer_id) if wallet_address else None
        stored_wallet = wallet_address
        if wallet_address and wallet_case == "lower":
            stored_wallet = wallet_address.lower()
        await conn.execute(
            "INSERT INTO far_session_contributions (session_id, peer_id, node_id, wallet_address, blocks, work_units,"
            " steps) VALUES ($1, $2, $3, $4, '0:4', $5, 1)", session_id, peer_id, node_id, stored_wallet, units)
    if finalize:
        await conn.execute("SELECT finalize_session($1, 'completed', 'length', $2, $3)", session_id, prompt_tokens,
                           completion_tokens)
    return session_id


async def seed_week(conn, wallets: list[str], *, sessions: int, seed: int = 1, small: list[str] = (),
                    max_tokens: int = 400) -> None:
    """``sessions`` random sessions among ``wallets`` (plus an unregistered peer now and then) and one tiny
    session for each ``small`` wallet (earning well under the 10 FAR minimum)."""
    rng = random.Random(seed)
    for _ in range(sessions):
        chosen = rng.sample(wallets, rng.randint(1, 3))
        contributions: list[tuple[str | None, int]] = [(w, rng.randint(1, 50) * rng.randint(1, 8)) for w in chosen]
        if rng.random() < 0.2:
            contributions.append((None, rng.randint(1, 40)))
        await seed_session(conn, contributions, completion_tokens=rng.randint(1, max_tokens),
                           prompt_tokens=rng.randint(0, 50), wallet_case=rng.choice(["checksum", "lower"]))
    for w in small:
        await seed_session(conn, [(w, 10)], completion_tokens=rng.randint(1, 100))


async def earned_by_wallet(conn, *, before: datetime | None = None) -> dict[str, Decimal]:
    """Σ payment_far of finalized contributions per (checksummed) wallet: what each wallet has earned."""
    rows = await conn.fetch(
        "SELECT lower(c.wallet_address) AS w, sum(c.payment_far) AS earned FROM far_session_contributions c "
        "JOIN far_mesh_sessions s USING (session_id) WHERE s.finalized_at IS NOT NULL AND c.node_id IS NOT NULL "
        "AND c.wallet_address IS NOT NULL AND ($1::timestamptz IS NULL OR s.finalized_at < $1) GROUP BY 1",
        before)
    return {to_checksum_address(row["w"]): Decimal(row["earned"]) for row in rows if row["earned"] > 0}


def expected_payments(contributions: list[tuple[str | None, int]], *, completion_tokens: int,
                      prompt_tokens: int = 0, price: Decimal = Decimal("0.01"), prompt_price: Decimal = Decimal(0),
                      fee_bps: int = 1000) -> dict[str, Decimal]:
    """SPEC "Accounting", independently in Python integers: shares round down to 1e-18 FAR."""
    cost_base = to_base_units(completion_tokens * price + prompt_tokens * prompt_price)
    total_units = sum(units for _, units in contributions)
    out: dict[str, Decimal] = defaultdict(Decimal)
    for w, units in contributions:
        if w is None or total_units == 0:
            continue
        share = cost_base * (10000 - fee_bps) * units // (10000 * total_units)
        out[w] += Decimal(share).scaleb(-18)
    return dict(out)


async def contribution_state(conn) -> list[tuple]:
    rows = await conn.fetch("SELECT c.session_id, c.peer_id, b.state FROM far_session_contributions c "
                            "LEFT JOIN far_payment_batches b ON b.batch_id = c.payment_batch_id "
                            "ORDER BY 1, 2")
    return [tuple(row) for row in rows]


async def snapshot(conn) -> dict[str, list]:
    """Every row of every payouts-relevant table, for "nothing changed" assertions."""
    out = {}
    for table in ("far_payment_batches", "far_payment_batch_items", "far_session_contributions", "far_mesh_sessions"):
        out[table] = [tuple(row) for row in await conn.fetch(f"SELECT * FROM {table} ORDER BY 1, 2")]
    out["seq"] = await conn.fetchval("SELECT last_value FROM far_payment_batch_number_seq")
    return out


def onchain_balances(chain, wallets) -> dict[str, Decimal]:
    return {w: Decimal(chain.far_balance(w)).scaleb(-18) for w in wallets}


def now() -> datetime:
    return datetime.now(timezone.utc)

"""Persistence of sessions and contributions (asyncpg). The money math is ``finalize_session()`` in SQL."""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Optional, Sequence

import asyncpg

from services.common.states import ServedBy, SessionStatus
from services.coordinator.metering import PeerWork


class DuplicateRequest(Exception):
    """A session of this account with this request_id exists already (request_id is an idempotency key)."""


class InsufficientBalance(Exception):
    def __init__(self, available: Decimal, required: Decimal):
        super().__init__(f"available {available} FAR, required {required} FAR")
        self.available, self.required = available, required


@dataclass(frozen=True)
class Pricing:
    price_per_token_far: Decimal
    price_per_prompt_token_far: Decimal
    platform_fee_bps: int


@dataclass(frozen=True)
class ContributionRow:
    node_id: Optional[str]
    peer_id: str
    wallet_address: Optional[str]
    blocks: str
    work_units: int
    steps: int
    payment_far: Decimal


def _json_list(value) -> list:
    """A JSONB column as asyncpg returns it (text, without a codec)."""
    if value is None:
        return []
    return json.loads(value) if isinstance(value, str) else list(value)


@dataclass(frozen=True)
class FinalSession:
    session_id: str
    request_id: str
    status: str
    finish_reason: Optional[str]
    prompt_tokens: int
    completion_tokens: int
    cost_far: Decimal
    fee_far: Decimal
    contributions: list[ContributionRow]
    output_text: Optional[str] = None
    account_id: Optional[str] = None
    replaced_servers: list = dataclasses.field(default_factory=list)  # failovers (engine.replaced_servers())
    served_by: ServedBy = ServedBy.SWARM
    refunded_far: Optional[Decimal] = None  # given back: a spot check proved a server's output wrong


class SessionStore:
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def create_session(self, *, request_id: str, model_id: str, pricing: Pricing, prompt_tokens: int,
                             user_wallet: Optional[str] = None, account_id: Optional[str] = None,
                             reserved_far: Decimal = Decimal(0), coordinator_id: Optional[str] = None,
                             session_id: Optional[str] = None, served_by: ServedBy = ServedBy.SWARM) -> str:
        """Insert the running session and, for an account, reserve ``reserved_far`` of its prepaid balance, in
        one transaction (402 if the balance not already reserved is short)."""
        session_id = session_id or str(uuid.uuid4())
        async with self.pool.acquire() as conn, conn.transaction():
            if account_id is not None:
                updated = await conn.fetchrow(
                    """UPDATE far_accounts SET reserved_far = reserved_far + $2
                        WHERE account_id = $1 AND balance_far - reserved_far >= $2 RETURNING account_id""",
                    uuid.UUID(account_id), reserved_far)
                if updated is None:
                    row = await conn.fetchrow("SELECT balance_far - reserved_far AS available FROM far_accounts "
                                              "WHERE account_id = $1", uuid.UUID(account_id))
                    raise InsufficientBalance(row["available"] if row else Decimal(0), reserved_far)
            try:
                await conn.execute(
                    """INSERT INTO far_mesh_sessions (session_id, request_id, account_id, user_wallet, model_id,
                           prompt_tokens, price_per_token_far, price_per_prompt_token_far, platform_fee_bps,
                           reserved_far, coordinator_id, served_by)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)""",
                    session_id, request_id, uuid.UUID(account_id) if account_id else None, user_wallet, model_id,
                    prompt_tokens, pricing.price_per_token_far, pricing.price_per_prompt_token_far,
                    pricing.platform_fee_bps, reserved_far, coordinator_id, served_by,
                )
            except asyncpg.UniqueViolationError:
                raise DuplicateRequest(request_id) from None
        return session_id

    async def checkpoint(self, session_id: str, completion_tokens: int, work: Sequence[PeerWork]) -> None:
        """Upsert absolute per-peer totals (a retried checkpoint never double counts) and tokens so far."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE far_mesh_sessions SET completion_tokens = $2 WHERE session_id = $1 AND finalized_at IS NULL",
                session_id, completion_tokens,
            )
            if not work:
                return
            await conn.execute(
                """INSERT INTO far_session_contributions
                       (session_id, peer_id, node_id, wallet_address, blocks, work_units, steps)
                   SELECT $1, p.peer_id, n.node_id, n.wallet_address, p.blocks, p.units, p.steps
                     FROM unnest($2::text[], $3::text[], $4::bigint[], $5::int[]) AS p(peer_id, blocks, units, steps)
                     LEFT JOIN far_nodes n ON n.peer_id = p.peer_id  -- any registration, whatever its state
                   ON CONFLICT (session_id, peer_id) DO UPDATE
                      SET work_units = excluded.work_units, steps = excluded.steps, blocks = excluded.blocks,
                          node_id = coalesce(far_session_contributions.node_id, excluded.node_id),
                          wallet_address = coalesce(far_session_contributions.wallet_address,
                                                    excluded.wallet_address)""",
                session_id,
                [w.peer_id for w in work], [w.blocks for w in work],
                [w.work_units for w in work], [w.steps for w in work],
            )

    async def finalize(self, session_id: str, *, status: str, finish_reason: Optional[str], prompt_tokens: int,
                       completion_tokens: int, output_text: Optional[str] = None,
                       error: Optional[str] = None, replaced_servers: Optional[list] = None) -> FinalSession:
        """Finalize once (``finalize_session()``) and settle the account: reserved → charged actual cost."""
        async with self.pool.acquire() as conn, conn.transaction():
            await _finalize_and_settle(conn, session_id, status, finish_reason, prompt_tokens, completion_tokens,
                                       output_text, error)
            if replaced_servers:
                await conn.execute("UPDATE far_mesh_sessions SET replaced_servers = $2::jsonb WHERE session_id = $1",
                                   session_id, json.dumps(replaced_servers))
        return await self.read_session(session_id)

    async def read_session(self, session_id: str) -> FinalSession:
        row = await self.pool.fetchrow("SELECT * FROM far_mesh_sessions WHERE session_id = $1", session_id)
        contributions = await self.pool.fetch(
            """SELECT node_id::text, peer_id, wallet_address, blocks, work_units, steps, payment_far
                 FROM far_session_contributions WHERE session_id = $1 ORDER BY blocks, peer_id""",
            session_id,
        )
        return FinalSession(
            session_id=str(row["session_id"]), request_id=row["request_id"], status=row["status"],
            finish_reason=row["finish_reason"], prompt_tokens=row["prompt_tokens"],
            completion_tokens=row["completion_tokens"], cost_far=row["cost_far"], fee_far=row["fee_far"],
            contributions=[ContributionRow(**dict(c)) for c in contributions],
            output_text=row["output_text"], account_id=str(row["account_id"]) if row["account_id"] else None,
            replaced_servers=_json_list(row.get("replaced_servers")), served_by=row["served_by"],
            refunded_far=await self.pool.fetchval(
                "SELECT amount_far FROM far_account_ledger WHERE session_id = $1 AND kind = 'refund'", session_id),
        )

    async def read_by_request_id(self, request_id: str, account_id: Optional[str]) -> Optional[FinalSession]:
        """The session of ``account_id`` with this request_id (request ids are idempotency keys per account)."""
        row = await self.find_by_request_id(request_id, account_id)
        return None if row is None else await self.read_session(str(row["session_id"]))

    async def find_by_request_id(self, request_id: str, account_id: Optional[str]) -> Optional[asyncpg.Record]:
        return await self.pool.fetchrow(
            "SELECT * FROM far_mesh_sessions WHERE request_id = $1 AND account_id IS NOT DISTINCT FROM $2",
            request_id, uuid.UUID(account_id) if account_id else None)

    async def interrupt_orphans(self, coordinator_id: str) -> int:
        """Finalize as 'interrupted' the running sessions a previous run of this coordinator left behind:
        the tokens already streamed (last checkpoint) are billed once, from the checkpointed contributions."""
        rows = await self.pool.fetch(
            "SELECT session_id, prompt_tokens, completion_tokens FROM far_mesh_sessions "
            "WHERE status = 'running' AND finalized_at IS NULL AND coordinator_id = $1", coordinator_id)
        for row in rows:
            async with self.pool.acquire() as conn, conn.transaction():
                await _finalize_and_settle(conn, row["session_id"], SessionStatus.INTERRUPTED, None, row["prompt_tokens"],
                                           row["completion_tokens"], None, "coordinator restarted mid-session")
        return len(rows)

    async def sweep_stale(self, stale_after_s: float, *, limit: int = 100) -> int:
        """Finalize as 'interrupted' the running sessions of ANY coordinator that have not been updated for
        ``stale_after_s`` seconds (``updated_at`` moves at every checkpoint; a live session never lives longer
        than GENERATION_TIMEOUT_S, so a stale one is orphaned: its coordinator died, or its finalize failed).
        Billed from the last checkpoint, the account settled. One session per transaction, taken with
        ``FOR UPDATE SKIP LOCKED``: coordinators sweeping at once never take the same session, and
        ``_finalize_and_settle`` (finalize_session()) finalizes each exactly once anyway. Returns the count."""
        swept = 0
        while swept < limit:
            async with self.pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    """SELECT session_id, prompt_tokens, completion_tokens FROM far_mesh_sessions
                        WHERE status = 'running' AND finalized_at IS NULL
                          AND updated_at < now() - make_interval(secs => $1)
                        ORDER BY updated_at LIMIT 1 FOR UPDATE SKIP LOCKED""", float(stale_after_s))
                if row is None:
                    break
                await _finalize_and_settle(conn, row["session_id"], SessionStatus.INTERRUPTED, None, row["prompt_tokens"],
                                           row["completion_tokens"], None,
                                           f"no progress for {stale_after_s:.0f} s: finalized by the stale-session "
                                           f"sweep")
            swept += 1
        return swept


async def _finalize_and_settle(conn, session_id, status, finish_reason, prompt_tokens, completion_tokens,
                               output_text, error) -> None:
    before = await conn.fetchrow(
        "SELECT finalized_at, account_id, reserved_far FROM far_mesh_sessions WHERE session_id = $1 FOR UPDATE",
        session_id)
    if before is None or before["finalized_at"] is not None:
        return  # already final (idempotent): the account was settled then
    await conn.execute("UPDATE far_mesh_sessions SET output_text = $2, error = $3 WHERE session_id = $1",
                       session_id, output_text, error)
    final = await conn.fetchrow("SELECT * FROM finalize_session($1, $2, $3, $4, $5)", session_id, status,
                                finish_reason, prompt_tokens, completion_tokens)
    if before["account_id"] is not None:
        # cost <= reserved (reserved is the cost of max_tokens), so the balance never goes negative.
        await conn.execute(
            """UPDATE far_accounts SET balance_far = balance_far - $2, reserved_far = reserved_far - $3
                WHERE account_id = $1""",
            before["account_id"], min(final["cost_far"], before["reserved_far"]), before["reserved_far"])

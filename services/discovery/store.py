"""Postgres: the record (far_nodes, the contribution ledger, payout batches) as discovery reads and writes it."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Optional, Sequence

import asyncpg

NODE_COLUMNS = """n.node_id::text AS node_id, n.peer_id, n.wallet_address, n.model_id, n.start_block, n.end_block,
    n.public_name, n.hardware::text AS hardware, n.state, n.tokens_served AS reported_tokens_served,
    n.vram_used_gb, n.gpu_temp_c, n.registered_at, n.last_seen,
    q.reason AS quarantine_reason, q.quarantined_at"""

# Tokens a node served = Σ over its contribution rows of work_units / (number of blocks of the row).
_ROW_BLOCKS = """(SELECT coalesce(sum(split_part(x, ':', 2)::int - split_part(x, ':', 1)::int), 0)
                  FROM unnest(string_to_array(c.blocks, ',')) AS x)"""


class NodeStore:
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def upsert_node(self, *, peer_id: str, wallet_address: str, model_id: str, start_block: int,
                          end_block: int, public_name: Optional[str], hardware: dict, public_key: bytes,
                          token_sha: str) -> tuple[str, Optional[str], bool]:
        """Register (or re-register) a peer. Returns (node_id, previous token hash, created)."""
        async with self.pool.acquire() as conn, conn.transaction():
            old = await conn.fetchrow("SELECT node_token_hash FROM far_nodes WHERE peer_id = $1 FOR UPDATE", peer_id)
            row = await conn.fetchrow(
                """INSERT INTO far_nodes (peer_id, wallet_address, model_id, start_block, end_block, public_name,
                                          hardware, public_key, node_token_hash, state, last_seen)
                   VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9, 'online', now())
                   ON CONFLICT (peer_id) DO UPDATE
                      SET wallet_address = excluded.wallet_address, model_id = excluded.model_id,
                          start_block = excluded.start_block, end_block = excluded.end_block,
                          public_name = excluded.public_name, hardware = excluded.hardware,
                          public_key = excluded.public_key, node_token_hash = excluded.node_token_hash,
                          state = 'online', last_seen = now()
                   RETURNING node_id::text""",
                peer_id, wallet_address, model_id, start_block, end_block, public_name, json.dumps(hardware),
                public_key, token_sha,
            )
        return row["node_id"], (old["node_token_hash"] if old else None), old is None

    async def node_for_token(self, token_sha: str) -> Optional[str]:
        return await self.pool.fetchval(
            "SELECT node_id::text FROM far_nodes WHERE node_token_hash = $1 AND state = 'online'", token_sha)

    async def unregister(self, node_id: str) -> Optional[str]:
        """State offline and token revoked; returns the revoked token hash."""
        return await self.pool.fetchval(
            """UPDATE far_nodes n SET state = 'offline', node_token_hash = NULL
                 FROM (SELECT node_id, node_token_hash FROM far_nodes WHERE node_id = $1 FOR UPDATE) old
                WHERE n.node_id = old.node_id
            RETURNING old.node_token_hash""", node_id)

    async def flush_heartbeats(self, pending: dict[str, dict]) -> int:
        """Write a batch of heartbeats with update_node_last_seen() (one statement). Nodes that are no longer
        online (unregistered meanwhile) are skipped, so a late flush never revives them."""
        if not pending:
            return 0
        ids = list(pending)
        return await self.pool.fetchval(
            """SELECT count(update_node_last_seen(n.node_id, 'online', u.tokens, u.vram, u.temp))
                 FROM unnest($1::uuid[], $2::bigint[], $3::numeric[], $4::numeric[]) AS u(id, tokens, vram, temp)
                 JOIN far_nodes n ON n.node_id = u.id AND n.state = 'online'""",
            ids,
            [pending[i].get("tokens_served") for i in ids],
            [_decimal(pending[i].get("vram_used_gb")) for i in ids],
            [_decimal(pending[i].get("gpu_temp_c")) for i in ids],
        )

    async def ledgers(self, node_ids: Sequence[str]) -> dict[str, dict]:
        """Per node: tokens served (from contributions) and FAR earned in finalized sessions."""
        if not node_ids:
            return {}
        rows = await self.pool.fetch(
            f"""SELECT c.node_id::text AS node_id,
                       coalesce(sum(c.work_units / nullif({_ROW_BLOCKS}, 0)), 0)::bigint AS tokens,
                       coalesce(sum(c.payment_far) FILTER (WHERE s.finalized_at IS NOT NULL), 0) AS earned
                  FROM far_session_contributions c
                  JOIN far_mesh_sessions s ON s.session_id = c.session_id
                 WHERE c.node_id = ANY($1::uuid[])
                 GROUP BY c.node_id""", list(node_ids))
        found = {r["node_id"]: {"tokens_served": int(r["tokens"]), "earned_far": str(r["earned"])} for r in rows}
        return {node_id: found.get(node_id, {"tokens_served": 0, "earned_far": "0"}) for node_id in node_ids}

    async def nodes_with_ledger_changes(self, since) -> list[str]:
        """Nodes whose contributions were written (checkpoint, finalize) at or after ``since``."""
        rows = await self.pool.fetch(
            """SELECT DISTINCT node_id::text AS node_id FROM far_session_contributions
                WHERE updated_at >= $1 AND node_id IS NOT NULL""", since)
        return [r["node_id"] for r in rows]

    async def count_registered(self) -> int:
        return await self.pool.fetchval("SELECT count(*) FROM far_nodes WHERE state = 'online'")

    async def db_now(self):
        return await self.pool.fetchval("SELECT now()")

    async def nodes(self, *, node_ids: Optional[Sequence[str]] = None, model_id: Optional[str] = None,
                    wallet: Optional[str] = None, peer_id: Optional[str] = None,
                    include_unregistered: bool = False) -> list[asyncpg.Record]:
        clauses, args = [], []
        if node_ids is not None:
            args.append(list(node_ids))
            clauses.append(f"n.node_id = ANY(${len(args)}::uuid[])")
        if model_id is not None:
            args.append(model_id)
            clauses.append(f"n.model_id = ${len(args)}")
        if wallet is not None:
            args.append(wallet.lower())
            clauses.append(f"lower(n.wallet_address) = ${len(args)}")
        if peer_id is not None:
            args.append(peer_id)
            clauses.append(f"n.peer_id = ${len(args)}")
        if not include_unregistered:
            clauses.append("n.state <> 'unregistered'")
        where = " AND ".join(clauses) or "true"
        return await self.pool.fetch(f"SELECT {NODE_COLUMNS} FROM far_nodes n LEFT JOIN far_quarantined_peers q ON q.peer_id = n.peer_id WHERE {where} ORDER BY n.model_id, "
                                     "n.start_block, n.peer_id", *args)

    async def node_money(self, node_id: str) -> dict:
        row = await self.pool.fetchrow(
            "SELECT earned_far, paid_far, pending_far FROM node_earnings_summary WHERE node_id = $1", node_id)
        last = await self.pool.fetchrow(
            """SELECT b.batch_id::text, b.batch_number, b.network, b.state, b.tx_hash,
                      coalesce(b.confirmed_at, b.created_at) AS at, sum(c.payment_far) AS amount
                 FROM far_session_contributions c JOIN far_payment_batches b ON b.batch_id = c.payment_batch_id
                WHERE c.node_id = $1
                GROUP BY b.batch_id ORDER BY b.created_at DESC LIMIT 1""", node_id)
        return {
            "earned_far": str(row["earned_far"]) if row else "0",
            "paid_far": str(row["paid_far"]) if row else "0",
            "pending_far": str(row["pending_far"]) if row else "0",
            "last_payout": None if last is None else {
                "batch_id": last["batch_id"], "batch_number": last["batch_number"], "network": last["network"],
                "state": last["state"], "tx_hash": last["tx_hash"], "date": last["at"].isoformat(),
                "amount_far": str(last["amount"]),
            },
        }

    # --- provider (wallet) views --------------------------------------------------------------------
    async def wallet_totals(self, wallet: str) -> dict:
        row = await self.pool.fetchrow(
            f"""SELECT count(DISTINCT c.session_id) FILTER (WHERE s.finalized_at IS NOT NULL) AS sessions,
                       coalesce(sum(c.work_units / nullif({_ROW_BLOCKS}, 0)), 0)::bigint AS tokens,
                       coalesce(sum(c.payment_far) FILTER (WHERE s.finalized_at IS NOT NULL), 0) AS earned,
                       coalesce(sum(c.payment_far) FILTER (WHERE s.finalized_at IS NOT NULL
                                                             AND b.state = 'confirmed'), 0) AS paid
                  FROM far_session_contributions c
                  JOIN far_mesh_sessions s ON s.session_id = c.session_id
                  LEFT JOIN far_payment_batches b ON b.batch_id = c.payment_batch_id
                 WHERE lower(c.wallet_address) = $1 AND c.node_id IS NOT NULL""", wallet.lower())
        earned, paid = row["earned"], row["paid"]
        return {"sessions": row["sessions"], "tokens_served": int(row["tokens"]), "earned": earned, "paid": paid,
                "pending": earned - paid}

    async def wallet_earnings(self, wallet: str, days: int) -> list[dict]:
        today = datetime.now(timezone.utc).date()
        start = today - timedelta(days=days - 1)
        rows = await self.pool.fetch(
            f"""SELECT (s.finalized_at AT TIME ZONE 'UTC')::date AS day,
                       count(DISTINCT c.session_id) AS sessions,
                       coalesce(sum(c.work_units / nullif({_ROW_BLOCKS}, 0)), 0)::bigint AS tokens,
                       coalesce(sum(c.payment_far), 0) AS earned
                  FROM far_session_contributions c
                  JOIN far_mesh_sessions s ON s.session_id = c.session_id
                 WHERE lower(c.wallet_address) = $1 AND c.node_id IS NOT NULL AND s.finalized_at IS NOT NULL
                   AND s.finalized_at >= $2::date
                 GROUP BY 1""", wallet.lower(), start)
        by_day = {r["day"]: r for r in rows}
        result = []
        for offset in range(days):
            day: date = start + timedelta(days=offset)
            r = by_day.get(day)
            result.append({"date": day.isoformat(), "sessions": r["sessions"] if r else 0,
                           "tokens_served": int(r["tokens"]) if r else 0,
                           "earned": r["earned"] if r else Decimal(0)})
        return result

    async def wallet_payments(self, wallet: str, limit: int = 200) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            """SELECT b.batch_id::text, b.batch_number, b.network, b.state, b.tx_hash, b.block_number,
                      b.created_at, b.confirmed_at, i.amount_far, i.session_count
                 FROM far_payment_batch_items i JOIN far_payment_batches b ON b.batch_id = i.batch_id
                WHERE lower(i.wallet_address) = $1
                ORDER BY b.created_at DESC LIMIT $2""", wallet.lower(), limit)

    async def check_records(self, peer_ids: Sequence[str]) -> dict[str, dict]:
        """Spot-check record per peer: checks by outcome as the checked server, failures as a verifier, and the
        disputed (withheld) amount of its contributions (docs/verification.md)."""
        rows = await self.pool.fetch(
            """SELECT p.peer_id,
                      (SELECT count(*) FROM far_spot_checks c WHERE c.checked_peer_id = p.peer_id
                          AND c.outcome = 'passed') AS passed,
                      (SELECT count(*) FROM far_spot_checks c WHERE c.suspect_peer_id = p.peer_id) AS failed,
                      (SELECT count(*) FROM far_spot_checks c WHERE c.checked_peer_id = p.peer_id
                          AND c.outcome = 'inconclusive') AS inconclusive,
                      (SELECT coalesce(sum(withheld_far), 0) FROM far_session_contributions s
                        WHERE s.peer_id = p.peer_id) AS disputed_far,
                      (SELECT count(*) FROM far_session_contributions s WHERE s.peer_id = p.peer_id
                          AND s.disputed_at IS NOT NULL) AS disputed_sessions
                 FROM unnest($1::text[]) AS p(peer_id)""", list(peer_ids))
        return {r["peer_id"]: dict(r) for r in rows}

    async def disputes(self, peer_ids: Sequence[str], limit: int = 50) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            """SELECT session_id::text, peer_id, blocks, withheld_far, payment_far, disputed_at, dispute_reason
                 FROM far_session_contributions WHERE peer_id = ANY($1::text[]) AND disputed_at IS NOT NULL
                ORDER BY disputed_at DESC LIMIT $2""", list(peer_ids), limit)

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")


def _decimal(value) -> Optional[Decimal]:
    return None if value is None else Decimal(str(value))

"""Self-service account API (docs/accounts.md): balance, statement (ledger), usage per request, API keys.

Routes (services/coordinator/api/account_routes.py) are thin; this module does the work over PostgreSQL. Every call
is authenticated by the account's API key or JWT (``InferenceService.authenticate``: keys are looked up in the
database on every request, never cached, so a revoked key is refused at once by every coordinator replica) and rate
limited per key in Redis, in a bucket of its own (``account:<key id>``) so polling a dashboard never eats the
generation quota.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Optional

from services.common.money import format_far
from services.coordinator.accounts import AccountStore, Principal
from services.coordinator.ratelimit import RateLimiter
from services.coordinator.errors import ServingError, rate_limited

CHAIN_IDS = {"testnet": 97, "mainnet": 56}


@dataclass(frozen=True)
class DepositInfo:
    """How to top up an account (shown by GET /mesh/account and in every 402)."""

    network: str
    contract_address: str
    token_address: str
    confirmations: int
    chain_id: Optional[int] = None

    @classmethod
    def from_settings(cls, settings) -> Optional["DepositInfo"]:
        if not settings.DEPOSIT_CONTRACT_ADDRESS:
            return None
        return cls(settings.BSC_NETWORK, settings.DEPOSIT_CONTRACT_ADDRESS, settings.FAR_TOKEN_ADDRESS,
                   settings.PAYOUT_CONFIRMATIONS, CHAIN_IDS.get(settings.BSC_NETWORK))

    def for_account(self, account_id: str, amount_far: Optional[Decimal] = None) -> dict:
        from services.deposits.watcher import account_ref

        ref = account_ref(account_id)
        amount = f"{format_far(amount_far)} FAR" if amount_far is not None else "the amount"
        return {
            "network": self.network, "chain_id": self.chain_id, "contract": self.contract_address,
            "token": self.token_address, "account_ref": ref, "confirmations": self.confirmations,
            "how": (f"on {self.network}: approve({self.contract_address}, amount) on the FAR token {self.token_address},"
                    f" then call deposit({ref}, amount) on {self.contract_address} ({amount} in base units of "
                    f"1e-18 FAR); credited after {self.confirmations} confirmations"),
            "docs": "docs/accounts.md#depositing-far",
        }


def _far(value: Optional[Decimal]) -> Optional[str]:
    return None if value is None else format_far(Decimal(value))


def _uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ServingError(404, f"{what}_not_found", f"no {what} {value!r} for this account") from None


class AccountService:
    def __init__(self, accounts: AccountStore, limiter: Optional[RateLimiter], deposit_info: Optional[DepositInfo],
                 *, max_keys: int = 50):
        self.accounts = accounts
        self.pool = accounts.pool
        self.limiter = limiter
        self.deposit_info = deposit_info
        self.max_keys = max_keys

    async def admit(self, principal: Principal) -> None:
        if self.limiter is None:
            return
        decision = await self.limiter.hit(f"account:{principal.key_id}", principal.rate_limit_per_minute)
        if not decision.allowed:
            raise rate_limited(principal.rate_limit_per_minute, decision.retry_after_s, "account requests")

    # ------------------------------------------------------------------------------------------- balance

    async def balance(self, principal: Principal) -> dict:
        row = await self.accounts.account(principal.account_id)
        if row is None:
            raise ServingError(404, "account_not_found", "the account no longer exists")
        totals = await self.pool.fetchrow(
            """SELECT coalesce(sum(amount_far) FILTER (WHERE kind = 'deposit'), 0) AS deposited,
                      coalesce(sum(amount_far) FILTER (WHERE kind IN ('grant', 'opening')), 0) AS granted,
                      coalesce(sum(amount_far) FILTER (WHERE kind = 'refund'), 0) AS refunded
                 FROM far_account_ledger WHERE account_id = $1""", uuid.UUID(principal.account_id))
        charged = await self.pool.fetchval(
            "SELECT coalesce(sum(cost_far), 0) FROM far_mesh_sessions WHERE account_id = $1 AND finalized_at IS NOT "
            "NULL", uuid.UUID(principal.account_id))
        return {
            "account_id": principal.account_id, "name": row["name"],
            "balance_far": _far(row["balance_far"]), "reserved_far": _far(row["reserved_far"]),
            "available_far": _far(row["balance_far"] - row["reserved_far"]),
            "deposited_far": _far(totals["deposited"]), "granted_far": _far(totals["granted"]),
            "refunded_far": _far(totals["refunded"]),
            "charged_far": _far(charged),
            "deposit": self.deposit_info.for_account(principal.account_id) if self.deposit_info else None,
        }

    # ------------------------------------------------------------------------------------------- ledger

    async def ledger(self, principal: Principal, *, limit: int, before: Optional[datetime]) -> dict:
        """Credits (deposits, grants, opening) and charges (finalized sessions: cost charged, the rest of the
        reservation released — the refund), newest first."""
        rows = await self.pool.fetch(
            """SELECT * FROM (
                   SELECT l.created_at AS at, l.kind, l.amount_far AS amount, l.balance_after_far, l.note,
                          d.tx_hash, d.log_index, d.block_number, d.from_address,
                          r.request_id, NULL::numeric AS reserved, NULL::text AS status
                     FROM far_account_ledger l LEFT JOIN far_deposits d USING (deposit_id)
                     LEFT JOIN far_mesh_sessions r ON r.session_id = l.session_id
                    WHERE l.account_id = $1
                   UNION ALL
                   SELECT s.finalized_at, 'charge', -s.cost_far, NULL, NULL, NULL, NULL, NULL, NULL,
                          s.request_id, s.reserved_far, s.status
                     FROM far_mesh_sessions s
                    WHERE s.account_id = $1 AND s.finalized_at IS NOT NULL) e
                WHERE $2::timestamptz IS NULL OR e.at < $2
                ORDER BY e.at DESC LIMIT $3""", uuid.UUID(principal.account_id), before, limit)
        entries = []
        for row in rows:
            entry = {"at": row["at"].isoformat(), "kind": row["kind"], "amount_far": _far(row["amount"])}
            if row["kind"] == "charge":
                entry.update(request_id=row["request_id"], status=row["status"], reserved_far=_far(row["reserved"]),
                             refunded_far=_far(row["reserved"] + row["amount"]))
            else:
                entry.update(balance_after_far=_far(row["balance_after_far"]), note=row["note"])
                if row["request_id"]:  # a refund names the request it gives back
                    entry.update(request_id=row["request_id"])
                if row["tx_hash"]:
                    entry.update(tx_hash=row["tx_hash"], log_index=row["log_index"],
                                 block_number=row["block_number"], from_address=row["from_address"])
            entries.append(entry)
        return {"entries": entries, "next_before": entries[-1]["at"] if len(entries) == limit else None}

    # -------------------------------------------------------------------------------------------- usage

    async def usage(self, principal: Principal, *, limit: int, before: Optional[datetime], days: int) -> dict:
        account = uuid.UUID(principal.account_id)
        sessions = await self.pool.fetch(
            """SELECT s.session_id, s.request_id, s.model_id, s.status, s.finish_reason, s.prompt_tokens,
                      s.completion_tokens, s.cost_far, s.reserved_far, s.created_at, s.finalized_at,
                      r.amount_far AS refunded_far, r.note AS refund_reason
                 FROM far_mesh_sessions s
                 LEFT JOIN far_account_ledger r ON r.session_id = s.session_id AND r.kind = 'refund'
                WHERE s.account_id = $1 AND ($2::timestamptz IS NULL OR s.created_at < $2)
                ORDER BY s.created_at DESC LIMIT $3""", account, before, limit)
        nodes: dict = {}
        if sessions:
            for row in await self.pool.fetch(
                    """SELECT session_id, node_id::text, peer_id, wallet_address, blocks, work_units, payment_far
                         FROM far_session_contributions WHERE session_id = ANY($1::uuid[])
                        ORDER BY blocks, peer_id""", [s["session_id"] for s in sessions]):
                nodes.setdefault(row["session_id"], []).append({
                    "node_id": row["node_id"], "peer_id": row["peer_id"], "wallet_address": row["wallet_address"],
                    "blocks": row["blocks"], "work_units": row["work_units"], "payment_far": _far(row["payment_far"])})
        requests = [{
            "request_id": s["request_id"], "model_id": s["model_id"], "status": s["status"],
            "finish_reason": s["finish_reason"], "prompt_tokens": s["prompt_tokens"],
            "completion_tokens": s["completion_tokens"], "cost_far": _far(s["cost_far"]),
            "reserved_far": _far(s["reserved_far"]), "created_at": s["created_at"].isoformat(),
            "finalized_at": s["finalized_at"].isoformat() if s["finalized_at"] else None,
            "refunded_far": _far(s["refunded_far"]) if s["refunded_far"] is not None else None,
            "refund_reason": s["refund_reason"],
            "nodes": nodes.get(s["session_id"], [])} for s in sessions]
        daily = await self.pool.fetch(
            """SELECT date_trunc('day', created_at AT TIME ZONE 'UTC')::date AS day, count(*) AS requests,
                      sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
                      coalesce(sum(cost_far), 0) AS cost_far
                 FROM far_mesh_sessions
                WHERE account_id = $1 AND created_at >= now() - make_interval(days => $2)
                GROUP BY 1 ORDER BY 1""", account, days)
        totals = await self.pool.fetchrow(
            """SELECT count(*) AS requests, coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
                      coalesce(sum(completion_tokens), 0) AS completion_tokens, coalesce(sum(cost_far), 0) AS cost_far
                 FROM far_mesh_sessions WHERE account_id = $1""", account)
        return {
            "requests": requests,
            "next_before": requests[-1]["created_at"] if len(requests) == limit else None,
            "daily": [{"day": d["day"].isoformat(), "requests": d["requests"], "prompt_tokens": d["prompt_tokens"],
                       "completion_tokens": d["completion_tokens"], "cost_far": _far(d["cost_far"])} for d in daily],
            "totals": {"requests": totals["requests"], "prompt_tokens": totals["prompt_tokens"],
                       "completion_tokens": totals["completion_tokens"], "cost_far": _far(totals["cost_far"])},
        }

    # --------------------------------------------------------------------------------------------- keys

    @staticmethod
    def _key(row, principal: Principal) -> dict:
        return {"key_id": str(row["key_id"]), "name": row["name"], "prefix": row["key_prefix"],
                "rate_limit_per_minute": row["rate_limit_per_minute"], "created_at": row["created_at"].isoformat(),
                "revoked_at": row["revoked_at"].isoformat() if row["revoked_at"] else None,
                "current": str(row["key_id"]) == principal.key_id}

    async def list_keys(self, principal: Principal) -> dict:
        rows = await self.accounts.list_keys(principal.account_id)
        return {"keys": [self._key(row, principal) for row in rows]}

    async def create_key(self, principal: Principal, *, name: Optional[str],
                         rate_limit_per_minute: Optional[int]) -> dict:
        # A key never gets a higher limit than the credential that created it (no escalation by self-service).
        limit = min(rate_limit_per_minute or principal.rate_limit_per_minute, principal.rate_limit_per_minute)
        async with self.pool.acquire() as conn, conn.transaction():
            # Serialize key creation per account, so the cap holds under concurrent calls.
            await conn.execute("SELECT 1 FROM far_accounts WHERE account_id = $1 FOR UPDATE",
                               uuid.UUID(principal.account_id))
            active = await conn.fetchval("SELECT count(*) FROM far_api_keys WHERE account_id = $1 AND revoked_at "
                                         "IS NULL", uuid.UUID(principal.account_id))
            if active >= self.max_keys:
                raise ServingError(409, "too_many_keys", f"the account has {active} active keys (at most "
                                                         f"{self.max_keys}); revoke one first")
            key_id, key = await AccountStore(conn).create_key(principal.account_id, name=name,
                                                              rate_limit_per_minute=limit)
            row = await conn.fetchrow("SELECT * FROM far_api_keys WHERE key_id = $1", uuid.UUID(key_id))
        return {**self._key(row, principal), "key": key}

    async def revoke_key(self, principal: Principal, key_id: str) -> dict:
        row = await self.pool.fetchrow(
            """UPDATE far_api_keys SET revoked_at = coalesce(revoked_at, now())
                WHERE key_id = $1 AND account_id = $2 RETURNING *""",
            _uuid(key_id, "key"), uuid.UUID(principal.account_id))
        if row is None:
            raise ServingError(404, "key_not_found", f"no key {key_id!r} for this account")
        return self._key(row, principal)

"""What a spot check's verdict does (docs/verification.md): persisted in ``far_spot_checks``; a failed check
disputes the suspect's contribution to that session (``dispute_contribution()``: its payment is withheld) and refunds
the user's charge of that session (``far_refund_session()``); an inconclusive check holds the contribution unpaid
until it is settled; ``quarantine_after`` failed checks quarantine the peer and its wallet (``quarantine_peer()``:
every unpaid contribution of both is forfeited): the coordinator stops routing through every peer of that wallet
(Petals' ``blocked_servers`` plus a ban that drops it from the current routes at once) and discovery shows it with
the reason."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Callable, Optional

import asyncpg

from services.common.logs import get_logger
from services.coordinator import metrics
from services.coordinator.verification import FAILED, INCONCLUSIVE, PASSED, CheckResult

log = get_logger(__name__)


class CheckStore:
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def record(self, result: CheckResult) -> None:
        job, verdict = result.job, result.verdict
        await self.pool.execute(
            """INSERT INTO far_spot_checks (session_id, model_id, checked_peer_id, blocks, positions, prefix_length,
                   verifier_peer_id, referee_peer_id, outcome, suspect_peer_id, error, tolerance, dtype)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)""",
            uuid.UUID(job.session_id) if job.session_id else None, job.model_id, job.peer_id,
            f"{job.start}:{job.end}", int(job.outputs.shape[1]), int(job.history.shape[1] - job.outputs.shape[1]),
            result.verifier, result.referee, verdict.outcome, result.suspect_peer,
            min(verdict.error, 1e300), result.tolerance, result.dtype)

    async def dispute(self, session_id: str, peer_id: str, blocks: str, reason: str) -> Optional[uuid.UUID]:
        """Dispute the contribution; returns the payout batch it was already in (then it is not withheld)."""
        row = await self.pool.fetchrow("SELECT * FROM dispute_contribution($1, $2, $3, $4)",
                                       uuid.UUID(session_id), peer_id, blocks, reason)
        return row["payment_batch_id"] if row else None

    async def failed_checks(self, peer_id: str) -> int:
        """Failed checks of ``peer_id`` since its quarantine was last lifted (a lift gives a fresh start)."""
        return await self.pool.fetchval(
            """SELECT count(*) FROM far_spot_checks
                WHERE suspect_peer_id = $1 AND created_at > coalesce(
                      (SELECT max(lifted_at) FROM far_quarantine_lifts WHERE peer_id = $1), '-infinity')""", peer_id)

    async def quarantine(self, peer_id: str, reason: str, failed_checks: int) -> Decimal:
        """Quarantine the peer and the wallet it registered with, and forfeit every unpaid contribution of both
        (SQL ``quarantine_peer()``). Returns the FAR withheld from finalized sessions by the forfeiture."""
        return await self.pool.fetchval("SELECT quarantine_peer($1, $2, $3)", peer_id, reason, failed_checks)

    async def quarantined(self) -> dict[str, str]:
        """Every peer not to route through: the quarantined ones and every registration of a quarantined wallet."""
        rows = await self.pool.fetch("SELECT peer_id, reason FROM far_quarantined_peers")
        return {row["peer_id"]: row["reason"] for row in rows}

    async def covered_peers(self, peer_id: str) -> list[str]:
        """The peers that ``peer_id``'s quarantine covers (itself and the other registrations of its wallet)."""
        rows = await self.pool.fetch("SELECT peer_id FROM far_quarantined_peers WHERE quarantined_peer_id = $1 "
                                     "ORDER BY peer_id", peer_id)
        return [row["peer_id"] for row in rows]

    async def registry(self) -> dict[str, str]:
        """peer id -> wallet (lower case) of the registered nodes: who may verify whom."""
        rows = await self.pool.fetch("SELECT peer_id, lower(wallet_address) AS wallet FROM far_nodes "
                                     "WHERE state <> 'unregistered' AND wallet_address IS NOT NULL")
        return {row["peer_id"]: row["wallet"] for row in rows}

    async def hold(self, session_id: str, peer_id: str, blocks: str, reason: str) -> None:
        """Hold the contribution unpaid while its check is unsettled (the payout planner skips it)."""
        await self.pool.execute("SELECT far_hold_contribution($1, $2, $3, $4)", uuid.UUID(session_id), peer_id,
                                blocks, reason)

    async def release(self, session_id: str, peer_id: str) -> None:
        await self.pool.execute("UPDATE far_session_contributions SET held_at = NULL, held_reason = NULL "
                                "WHERE session_id = $1 AND peer_id = $2 AND held_at IS NOT NULL",
                                uuid.UUID(session_id), peer_id)

    async def refund(self, session_id: str, note: str) -> Decimal:
        """Give the user back a finalized session's charge once a check proved its output wrong (SQL
        ``far_refund_session()``; a running session is refunded as it is finalized). Returns what was refunded."""
        return await self.pool.fetchval("SELECT far_refund_session($1, $2)", uuid.UUID(session_id), note)

    async def quarantine_list(self, *, history: bool = False) -> list[dict]:
        """The quarantined peers (with the node that registered each, when known), newest first; with ``history``
        also the lifted quarantines (``lifted_at``, ``lifted_by``, ``lift_reason``)."""
        rows = await self.pool.fetch(
            """SELECT q.peer_id, q.reason, q.failed_checks, q.quarantined_at, NULL::timestamptz AS lifted_at,
                      NULL AS lifted_by, NULL AS lift_reason, n.node_id::text AS node_id, n.public_name,
                      coalesce(n.wallet_address, q.wallet_address) AS wallet_address
                 FROM far_quarantine q LEFT JOIN far_nodes n ON n.peer_id = q.peer_id
               UNION ALL
               SELECT l.peer_id, l.reason, l.failed_checks, l.quarantined_at, l.lifted_at, l.lifted_by, l.lift_reason,
                      n.node_id::text, n.public_name, coalesce(n.wallet_address, l.wallet_address)
                 FROM far_quarantine_lifts l LEFT JOIN far_nodes n ON n.peer_id = l.peer_id
                WHERE $1
                ORDER BY lifted_at DESC NULLS FIRST, quarantined_at DESC""", history)
        return [dict(row) for row in rows]

    async def lift(self, peer_id: str, *, lifted_by: str, reason: str) -> dict:
        """Lift ``peer_id``'s quarantine (SQL ``lift_quarantine()``: recorded in ``far_quarantine_lifts``); a node
        id (uuid of far_nodes) names its peer. LookupError when it is not quarantined, ValueError without a
        reason. Coordinators route through it again at their next quarantine sync."""
        if not reason.strip():
            raise ValueError("a reason is required (--reason)")
        peer = await self.pool.fetchval("SELECT peer_id FROM far_nodes WHERE node_id::text = $1", peer_id)
        # a peer quarantined through its wallet: lifting means lifting the quarantine that covers it
        peer = await self.pool.fetchval("SELECT quarantined_peer_id FROM far_quarantined_peers WHERE peer_id = $1",
                                        peer or peer_id) or peer
        try:
            row = await self.pool.fetchrow("SELECT * FROM lift_quarantine($1, $2, $3)", peer or peer_id,
                                           lifted_by, reason)
        except asyncpg.NoDataFoundError:
            raise LookupError(f"peer {peer or peer_id} is not quarantined "
                              "(far-mesh nodes quarantined lists the quarantined peers)") from None
        except asyncpg.CheckViolationError as error:
            raise ValueError(error.args[0] if error.args else str(error)) from None
        return dict(row)

    async def passed_counts(self) -> dict[str, int]:
        """Passed checks per peer since its last failure (seeds the sampling policy's record at start)."""
        rows = await self.pool.fetch(
            """SELECT c.checked_peer_id AS peer_id, count(*) AS passed FROM far_spot_checks c
                WHERE c.outcome = 'passed' AND c.created_at > coalesce(
                      (SELECT max(f.created_at) FROM far_spot_checks f WHERE f.suspect_peer_id = c.checked_peer_id),
                      '-infinity')
                GROUP BY c.checked_peer_id""")
        return {row["peer_id"]: int(row["passed"]) for row in rows}


async def sync_quarantine(store: CheckStore, swarm) -> tuple[set[str], set[str]]:
    """Make the swarm's quarantine (``SwarmModel.quarantined``) the database's: quarantine the peers another
    coordinator (or this one before a restart) quarantined, route through the lifted ones again. Returns
    (added, lifted)."""
    before = set(swarm.quarantined)  # read before the database: a peer quarantined meanwhile is in both or neither
    current = set(await store.quarantined())
    added, lifted = current - before, before - current
    for peer_id in sorted(added):
        await asyncio.to_thread(swarm.quarantine, peer_id)
    for peer_id in sorted(lifted):
        await asyncio.to_thread(swarm.unquarantine, peer_id)
    metrics.QUARANTINED.set(len(swarm.quarantined))
    checker = getattr(swarm, "spot_checker", None)
    if checker is not None:  # who may verify: the registrations as they are now
        checker.registry = await store.registry()
    return added, lifted


async def keep_quarantine_synced(store: CheckStore, swarm, interval_s: float) -> None:
    """The coordinator's background task: ``sync_quarantine`` every ``interval_s`` (SPOT_CHECK_QUARANTINE_SYNC_S),
    so a lift (``far-mesh nodes unquarantine``) or another coordinator's quarantine takes effect within it."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            added, lifted = await sync_quarantine(store, swarm)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001  (the database may be away for a while: try again later)
            log.warning("quarantine sync failed", error=str(error))
            continue
        for peer_id in added:
            log.warning("peer quarantined (read from the database)", peer_id=peer_id)
        for peer_id in lifted:
            log.warning("quarantine lifted: routing through the peer again", peer_id=peer_id)


def reason_of(result: CheckResult) -> str:
    """Why the suspect is one: how far its outputs are from the reference's (the trusted verifier's, a referee's,
    or the other two servers')."""
    job, verdict = result.job, result.verdict
    reference = result.referee or result.verifier
    if verdict.outcome == FAILED:
        what, distance = f"blocks {job.start}:{job.end} ({job.outputs.shape[1]} positions)", verdict.referee_checked
    else:
        what, distance = f"its verification of {job.peer_id}'s blocks {job.start}:{job.end}", verdict.referee_verifier
    return (f"spot check of {what} failed: its outputs are {distance:.3g} away (relative L2) from {reference}'s "
            f"and {verdict.error:.3g} from the other server's, tolerance {result.tolerance:g} ({result.dtype})")


class CheckConsequences:
    """``SpotChecker.on_result``: runs in the checker's thread, does the database work on the event loop."""

    def __init__(self, store: CheckStore, loop: asyncio.AbstractEventLoop, *, quarantine_after: int,
                 on_quarantine: Callable[[str, str], None]):
        self.store = store
        self.loop = loop
        self.quarantine_after = quarantine_after
        self.on_quarantine = on_quarantine

    def __call__(self, result: CheckResult) -> None:
        asyncio.run_coroutine_threadsafe(self.apply(result), self.loop).result(timeout=60)

    async def apply(self, result: CheckResult) -> None:
        job, verdict = result.job, result.verdict
        metrics.SPOT_CHECKS.labels(job.model_id, verdict.outcome).inc()
        await self.store.record(result)
        blocks = f"{job.start}:{job.end}"
        if verdict.outcome == INCONCLUSIVE:
            log.warning("spot check inconclusive: held unpaid until settled", checked=job.peer_id,
                        verifier=result.verifier, referee=result.referee, error=verdict.error,
                        tolerance=result.tolerance)
            if job.session_id is not None:
                await self.store.hold(job.session_id, job.peer_id, blocks,
                                      f"spot check of blocks {blocks} inconclusive: {result.verifier} disagrees "
                                      f"({verdict.error:.3g}, tolerance {result.tolerance:g}) and nobody settled it")
            return
        if job.held and job.session_id is not None:  # settled at last: the hold ends (a dispute follows below)
            await self.store.release(job.session_id, job.peer_id)
        suspect = result.suspect_peer
        if verdict.outcome == PASSED or suspect is None:
            return
        reason = reason_of(result)
        log.warning("spot check failed", suspect=suspect, session_id=job.session_id, reason=reason)
        if verdict.outcome == FAILED and job.session_id is not None:
            batch = await self.store.dispute(job.session_id, suspect, blocks, reason)
            if batch is not None:
                log.error("disputed contribution was already in a payout batch: not withheld",
                          session_id=job.session_id, peer_id=suspect, batch_id=str(batch))
            refunded = await self.store.refund(job.session_id, f"refund: a spot check proved {suspect}'s output "
                                                               f"wrong ({blocks})")
            if refunded:
                log.warning("session refunded: a server's output was proven wrong", session_id=job.session_id,
                            refunded_far=str(refunded))
        await self._maybe_quarantine(suspect, reason)

    async def _maybe_quarantine(self, suspect: str, reason: str) -> None:
        failures = await self.store.failed_checks(suspect)
        if failures < self.quarantine_after:
            return
        why = f"{failures} failed spot checks; last: {reason}"
        forfeited = await self.store.quarantine(suspect, why, failures)
        log.error("peer quarantined: its wallet's unpaid earnings are forfeited", peer_id=suspect,
                  forfeited_far=str(forfeited))
        for peer_id in await self.store.covered_peers(suspect) or [suspect]:
            self.on_quarantine(peer_id, why)

"""What a spot check's verdict does (issue 17, docs/verification.md): persisted in ``far_spot_checks``; a failed
check disputes the suspect's contribution to that session (``dispute_contribution()``: its payment is withheld,
the user's charge is unchanged); ``quarantine_after`` failed checks quarantine the peer (``far_quarantine``): the
coordinator stops routing through it (Petals' ``blocked_servers`` plus a ban that drops it from the current routes
at once) and discovery shows it with the reason."""

from __future__ import annotations

import asyncio
import uuid
from typing import Callable, Optional

import asyncpg

from services.common.logs import get_logger
from services.coordinator import metrics
from services.coordinator.verification import FAILED, CheckResult

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
        return await self.pool.fetchval("SELECT count(*) FROM far_spot_checks WHERE suspect_peer_id = $1", peer_id)

    async def quarantine(self, peer_id: str, reason: str, failed_checks: int) -> None:
        await self.pool.execute(
            """INSERT INTO far_quarantine (peer_id, reason, failed_checks) VALUES ($1, $2, $3)
               ON CONFLICT (peer_id) DO UPDATE SET failed_checks = excluded.failed_checks""",
            peer_id, reason, failed_checks)

    async def quarantined(self) -> dict[str, str]:
        rows = await self.pool.fetch("SELECT peer_id, reason FROM far_quarantine")
        return {row["peer_id"]: row["reason"] for row in rows}

    async def passed_counts(self) -> dict[str, int]:
        """Passed checks per peer since its last failure (seeds the sampling policy's record at start)."""
        rows = await self.pool.fetch(
            """SELECT c.checked_peer_id AS peer_id, count(*) AS passed FROM far_spot_checks c
                WHERE c.outcome = 'passed' AND c.created_at > coalesce(
                      (SELECT max(f.created_at) FROM far_spot_checks f WHERE f.suspect_peer_id = c.checked_peer_id),
                      '-infinity')
                GROUP BY c.checked_peer_id""")
        return {row["peer_id"]: int(row["passed"]) for row in rows}


def reason_of(result: CheckResult) -> str:
    job, verdict = result.job, result.verdict
    return (f"spot check of blocks {job.start}:{job.end} ({job.outputs.shape[1]} positions) failed: its outputs are "
            f"{verdict.referee_checked if verdict.outcome == FAILED else verdict.referee_verifier:.3g} away "
            f"(relative L2) from {result.referee if verdict.outcome == FAILED else job.peer_id}'s and "
            f"{verdict.error:.3g} from the other server's, tolerance {result.tolerance:g} ({result.dtype})")


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
        suspect = result.suspect_peer
        if suspect is None:
            if verdict.outcome != "passed":
                log.warning("spot check inconclusive: two servers disagree and no third could settle it",
                            checked=job.peer_id, verifier=result.verifier, error=verdict.error,
                            tolerance=result.tolerance)
            return
        reason = reason_of(result)
        log.warning("spot check failed", suspect=suspect, session_id=job.session_id, reason=reason)
        if verdict.outcome == FAILED and job.session_id is not None:
            batch = await self.store.dispute(job.session_id, suspect, f"{job.start}:{job.end}", reason)
            if batch is not None:
                log.error("disputed contribution was already in a payout batch: not withheld",
                          session_id=job.session_id, peer_id=suspect, batch_id=str(batch))
        failures = await self.store.failed_checks(suspect)
        if failures >= self.quarantine_after:
            why = f"{failures} failed spot checks; last: {reason}"
            await self.store.quarantine(suspect, why, failures)
            self.on_quarantine(suspect, why)

"""The crash-safe payout state machine (docs/payouts.md).

A batch moves::

    planned --sign--> signed --broadcast--> submitted --a send succeeded + PAYOUT_CONFIRMATIONS--> confirmed
       \\                                     ^   \\--every send unminable, PAYOUT_CONFIRMATIONS deep--> re-send
        \\--estimate reverts-> failed          \\----- payment removed by a reorg before finality <--/

* **planned**: the batch row, its items and the attachment of its contributions (``payment_batch_id``) are
  written in ONE database transaction, so contributions are either in exactly one open batch or free.
* **signed**: raw transaction, hash, nonce, gas limit (and chain id + contract) are stored (also in
  ``far_payment_transactions``) *before* the first broadcast.
* **submitted**: the node has one of the batch's transactions. **confirmed**: one of them mined with status 1, and
  that receipt, re-read once ``PAYOUT_CONFIRMATIONS`` blocks are on top, is still in a canonical block. Until it is
  final (``PAYOUT_FINALITY_BLOCKS`` deep, and in the node's ``finalized`` block on BSC) every run re-reads it; a
  reorg that removed it sends the batch back to submitted.
* A batch keeps its batchId until it is paid: a transaction that cannot be mined any more (it reverted, or its
  nonce went to another transaction, PAYOUT_CONFIRMATIONS deep) is followed by a **re-send of the same batchId**;
  a dropped one is re-broadcast with the same bytes (same nonce). FarPayout pays a batchId once, so whichever of
  them any reorg mines, the wallets are paid once. **failed** is only for a planned batch (no transaction carries
  its batchId): its contributions are released and planned again by the *next* run, with a new batchId.

Every state change goes through ``PayoutExecutor._transition`` and the table ``TRANSITIONS``; the database
enforces the same table and refuses to detach the contributions of a batch that is not failed
(migrations ``0004_payout_guards``, ``0012_payout_resends``).

A run takes a PostgreSQL advisory lock (a second tracker skips), re-reads the confirmed batches that are not final,
resumes every open batch, and plans new batches only when nothing is left open. A crash anywhere therefore leaves a state the next run finishes,
and the contract's "batchId paid once" rule backs this up on chain.

``FAR_MESH_PAYOUTS_CRASH_AT=<checkpoint>[:n]`` (tests only) SIGKILLs the process at the n-th (default first)
time the named checkpoint is reached: planned, signed, broadcast (sent, before the DB knows), submitted,
mined (receipt seen, before the DB knows), confirmed, failed.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import asyncpg
from eth_utils import to_checksum_address
from web3.exceptions import ContractLogicError, TransactionNotFound

from services.common.crash_points import CrashPoints, InjectedCrash  # noqa: F401  (InjectedCrash: for tests)
from services.common.logs import get_logger
from services.common.money import to_base_units
from services.common.states import OPEN_BATCH_STATES, BatchState
from services.payouts import metrics
from services.payouts.chain import Chain
from services.payouts.planner import (
    ELIGIBLE_WHERE,
    Plan,
    WalletDue,
    build_plan,
    max_recipients_for_gas,
)

log = get_logger(__name__)



def is_revert(error: BaseException) -> bool:
    """A revert reported by a node (ContractLogicError) or by in-process py-evm (eth-tester's TransactionFailed,
    matched by name so that real networks do not pay eth-tester's ~1 s import)."""
    kind = type(error)
    return isinstance(error, ContractLogicError) or (
        kind.__name__ == "TransactionFailed" and kind.__module__.startswith("eth_tester"))


ADVISORY_LOCK_KEY = int.from_bytes(hashlib.sha256(b"far-mesh:payouts").digest()[:8], "big", signed=True)
# The one table of legal batch state changes. Every state change goes through PayoutExecutor._transition, and the
# database enforces the same table (trigger far_payment_batches_guard, migration 0004_payout_guards).
# Only a planned batch fails (no transaction carries its batchId); a confirmed one whose payment a reorg removed
# before finality goes back to submitted and is sent again with the same batchId.
TRANSITIONS: dict[BatchState, frozenset[BatchState]] = {
    BatchState.PLANNED: frozenset({BatchState.SIGNED, BatchState.FAILED}),
    BatchState.SIGNED: frozenset({BatchState.SUBMITTED}),
    BatchState.SUBMITTED: frozenset({BatchState.CONFIRMED}),
    BatchState.CONFIRMED: frozenset({BatchState.SUBMITTED}),
    BatchState.FAILED: frozenset(),
}
# Bounds the work on one batch in one run (each step is a broadcast, a re-send or a wait); the next run goes on.
MAX_STEPS_PER_RUN = 12
# Where a fault-injection test can crash the executor: after each recorded state, and between the chain's steps.
CHECKPOINTS = ("planned", "signed", "broadcast", "submitted", "mined", "confirmed", "failed")
CRASH_ENV = "FAR_MESH_PAYOUTS_CRASH_AT"

ATTACH_SQL = f"""
WITH wallets AS (SELECT DISTINCT unnest($3::text[]) AS wallet),
attached AS (
    UPDATE far_session_contributions c
       SET payment_batch_id = $2, updated_at = now()
      FROM far_mesh_sessions s, wallets w
     WHERE s.session_id = c.session_id
       AND lower(c.wallet_address) = w.wallet
       AND {ELIGIBLE_WHERE}
    RETURNING lower(c.wallet_address) AS wallet, c.payment_far, c.session_id
)
SELECT wallet, sum(payment_far) AS amount_far, count(DISTINCT session_id) AS session_count, count(*) AS n
FROM attached
GROUP BY wallet
ORDER BY wallet
"""


class PayoutError(RuntimeError):
    """Something needs an operator (inconsistent chain/database state); the batch is left as it is."""


@dataclass
class BatchOutcome:
    batch_id: str
    batch_number: int
    state: str
    total_far: Decimal
    recipient_count: int
    tx_hash: str | None = None
    block_number: int | None = None
    error: str | None = None
    resumed: bool = False


@dataclass
class RunReport:
    network: str
    dry_run: bool = False
    skipped: str | None = None
    plan: Plan | None = None
    open_batches: list[dict[str, Any]] = field(default_factory=list)
    batches: list[BatchOutcome] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def paid_far(self) -> Decimal:
        return sum((b.total_far for b in self.batches if b.state == BatchState.CONFIRMED), Decimal(0))

    @property
    def ok(self) -> bool:
        return not self.errors and all(b.state in (BatchState.CONFIRMED,) for b in self.batches)


class PayoutExecutor:
    def __init__(self, postgres_url: str, chain: Chain | None, *, network: str, min_payout_far: Decimal,
                 max_recipients: int = 200, gas_cap: int = 10_000_000, confirmations: int = 3,
                 finality_blocks: int = 64, receipt_timeout_s: float = 180.0, poll_interval_s: float | None = None,
                 crash_at: str | None = None) -> None:
        self.postgres_url = postgres_url
        self.chain = chain
        self.network = network
        self.min_payout_far = Decimal(min_payout_far)
        self.gas_cap = gas_cap
        self.max_recipients = max_recipients_for_gas(gas_cap, max_recipients)
        self.confirmations = confirmations
        self.finality_blocks = max(finality_blocks, confirmations)
        self.receipt_timeout_s = receipt_timeout_s
        local = chain is not None and chain.is_local
        self.poll_interval_s = poll_interval_s if poll_interval_s is not None else (0.05 if local else 2.0)
        self._crash_points = CrashPoints("payouts.crash_injected", crash_at, CRASH_ENV)
        self.released = False  # a batch failed (released its contributions) in this run: plan nothing more

    @classmethod
    def from_settings(cls, settings, chain: Chain | None, *, network: str | None = None, **overrides):
        kwargs = dict(network=network or settings.BSC_NETWORK, min_payout_far=settings.MIN_PAYOUT_FAR,
                      max_recipients=settings.MAX_RECIPIENTS_PER_TX, gas_cap=settings.PAYOUT_MAX_GAS,
                      confirmations=settings.PAYOUT_CONFIRMATIONS,
                      finality_blocks=settings.PAYOUT_FINALITY_BLOCKS)
        kwargs.update(overrides)
        return cls(settings.POSTGRES_URL, chain, **kwargs)

    # ------------------------------------------------------------------------------------------ run

    async def run_once(self, *, dry_run: bool = False, cutoff: datetime | None = None,
                       resume_only: bool = False) -> RunReport:
        """One tracker run: resume open batches, then plan and pay new ones (unless ``resume_only``)."""
        cutoff = cutoff or datetime.now(timezone.utc)
        report = RunReport(network=self.network, dry_run=dry_run)
        started = time.monotonic()
        conn = await asyncpg.connect(self.postgres_url)
        try:
            if dry_run:
                return await self._dry_run(conn, cutoff, report)
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", ADVISORY_LOCK_KEY):
                report.skipped = "another payment tracker holds the payouts lock"
                log.warning("payouts.locked")
                metrics.RUNS.labels("skipped").inc()
                return report
            try:
                await self._run_locked(conn, cutoff, report, resume_only=resume_only)
            finally:
                if not conn.is_closed():
                    await conn.fetchval("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
        except InjectedCrash:
            raise
        except Exception as error:  # noqa: BLE001 - reported, counted, re-raised
            metrics.FAILURES.labels("run").inc()
            metrics.RUNS.labels("error").inc()
            log.exception("payouts.run_failed")
            report.errors.append(f"{type(error).__name__}: {error}")
            raise
        finally:
            await conn.close()
            metrics.RUN_DURATION.observe(time.monotonic() - started)
            metrics.LAST_RUN.set(time.time())
        metrics.RUNS.labels("ok" if report.ok else "failed").inc()
        if report.ok:
            metrics.LAST_SUCCESS.set(time.time())
        metrics.LAST_RUN_PAID_FAR.set(float(report.paid_far))
        return report

    async def _dry_run(self, conn, cutoff: datetime, report: RunReport) -> RunReport:
        async with conn.transaction(readonly=True):
            report.open_batches = [dict(row) for row in await conn.fetch(
                "SELECT batch_id, batch_number, network, state, total_far, recipient_count, tx_hash "
                "FROM far_payment_batches WHERE state = ANY($1::text[]) ORDER BY batch_number", list(OPEN_BATCH_STATES))]
            report.plan = await build_plan(conn, cutoff=cutoff, min_payout_far=self.min_payout_far,
                                           max_recipients=self.max_recipients)
        return report

    async def _run_locked(self, conn, cutoff: datetime, report: RunReport, *, resume_only: bool) -> None:
        if self.chain is None:
            raise PayoutError("no chain connection")
        self.released = False
        await self._recheck_confirmed(conn)
        for row in await self._open_batches(conn):
            outcome = await self._drive(conn, row, resumed=True)
            report.batches.append(outcome)
        still_open = await self._open_batches(conn)
        metrics.OPEN_BATCHES.set(len(still_open))
        if still_open:
            numbers = ", ".join(str(row["batch_number"]) for row in still_open)
            report.errors.append(f"batches still open after resuming ({numbers}); no new batch planned")
            return
        if resume_only:
            return
        if self.released:
            # Never re-plan in the run that released contributions: the next run plans them, with a new batchId.
            report.errors.append("a batch failed and released its contributions; the next run plans them again")
            return
        plan = await build_plan(conn, cutoff=cutoff, min_payout_far=self.min_payout_far,
                                max_recipients=self.max_recipients)
        report.plan = plan
        metrics.CARRIED_OVER_FAR.set(float(plan.carried_over_far))
        log.info("payouts.plan", batches=len(plan.batches), recipients=plan.recipient_count,
                 total_far=str(plan.total_far), carried_over=len(plan.carried_over), cutoff=cutoff.isoformat())
        for planned in plan.batches:
            row = await self._create_batch(conn, planned.items, cutoff)
            if row is None:
                continue
            outcome = await self._drive(conn, row)
            report.batches.append(outcome)
            if outcome.state != BatchState.CONFIRMED:
                report.errors.append(f"batch {outcome.batch_number} ended {outcome.state}: {outcome.error or ''}")
                break  # the next run resumes / re-plans
        metrics.OPEN_BATCHES.set(len(await self._open_batches(conn)))

    async def _open_batches(self, conn) -> list[asyncpg.Record]:
        rows = await conn.fetch("SELECT * FROM far_payment_batches WHERE state = ANY($1::text[]) "
                                "ORDER BY batch_number", list(OPEN_BATCH_STATES))
        for row in rows:
            if row["network"] != self.network:
                raise PayoutError(f"batch {row['batch_number']} is {row['state']} on network {row['network']}; "
                                  f"finish it with --network {row['network']} first")
        return rows

    def _checkpoint(self, name: str, batch_number: int | None = None) -> None:
        self._crash_points(name, batch_number=batch_number)

    # --------------------------------------------------------------------------------------- create

    async def _create_batch(self, conn, items: tuple[WalletDue, ...], cutoff: datetime):
        """planned: insert the batch, attach its contributions and write its items, atomically."""
        try:
            return await self._insert_batch(conn, items, cutoff)
        except _Rollback:
            log.warning("payouts.batch_empty", wallets=len(items))
            return None

    async def _insert_batch(self, conn, items: tuple[WalletDue, ...], cutoff: datetime):
        chain = self.chain
        async with conn.transaction():
            batch = await conn.fetchrow(
                "INSERT INTO far_payment_batches (network, state, cutoff, total_far, recipient_count, from_address,"
                " chain_id, contract_address) VALUES ($1, 'planned', $2, 0, 0, $3, $4, $5) RETURNING *",
                self.network, cutoff, chain.address, chain.chain_id, chain.payout.address)
            wallets = [item.wallet.lower() for item in items]
            attached = await conn.fetch(ATTACH_SQL, cutoff, batch["batch_id"], wallets)
            planned = {item.wallet.lower(): item.amount_far for item in items}
            rows = []
            for row in attached:
                amount = Decimal(row["amount_far"])
                if amount != planned.get(row["wallet"]):
                    log.warning("payouts.plan_changed", wallet=row["wallet"], planned=str(planned.get(row["wallet"])),
                                attached=str(amount))
                rows.append((batch["batch_id"], to_checksum_address(row["wallet"]), amount,
                             Decimal(to_base_units(amount)), int(row["session_count"])))
            if not rows:
                raise _Rollback()
            await conn.executemany(
                "INSERT INTO far_payment_batch_items (batch_id, wallet_address, amount_far, amount_base, session_count)"
                " VALUES ($1, $2, $3, $4, $5)", rows)
            total = sum((row[2] for row in rows), Decimal(0))
            batch = await conn.fetchrow(
                "UPDATE far_payment_batches SET total_far = $2, recipient_count = $3 WHERE batch_id = $1 RETURNING *",
                batch["batch_id"], total, len(rows))
        log.info("payouts.batch_planned", batch_number=batch["batch_number"], recipients=len(rows),
                 total_far=str(total))
        self._checkpoint(BatchState.PLANNED, batch["batch_number"])
        return batch

    # ---------------------------------------------------------------------------------------- drive

    async def _drive(self, conn, batch, *, resumed: bool = False) -> BatchOutcome:
        number = batch["batch_number"]
        if resumed:
            log.info("payouts.resume", batch_number=number, state=batch["state"], tx_hash=batch["tx_hash"])
        self._check_target(batch)
        for _ in range(MAX_STEPS_PER_RUN):
            if batch["state"] not in OPEN_BATCH_STATES:
                break
            if batch["state"] == BatchState.PLANNED:
                batch = await self._sign(conn, batch)
                continue
            batch, waiting = await self._advance_open(conn, batch)
            if waiting:
                break
        outcome = BatchOutcome(str(batch["batch_id"]), number, batch["state"], Decimal(batch["total_far"]),
                               batch["recipient_count"], batch["paid_tx_hash"] or batch["tx_hash"],
                               batch["block_number"], batch["error"], resumed)
        if outcome.state in (BatchState.CONFIRMED, BatchState.FAILED):
            metrics.BATCHES.labels(outcome.state).inc()
        return outcome

    def _check_target(self, batch) -> None:
        chain = self.chain
        if batch["chain_id"] is not None and batch["chain_id"] != chain.chain_id:
            raise PayoutError(f"batch {batch['batch_number']} was made for chain {batch['chain_id']}, "
                              f"connected to {chain.chain_id}")
        if batch["contract_address"] and batch["contract_address"].lower() != chain.payout.address.lower():
            raise PayoutError(f"batch {batch['batch_number']} pays through {batch['contract_address']}, "
                              f"configured contract is {chain.payout.address}")
        if batch["from_address"] and batch["from_address"].lower() != chain.address.lower():
            raise PayoutError(f"batch {batch['batch_number']} was made for payer {batch['from_address']}, "
                              f"configured key is {chain.address}")

    async def _items(self, conn, batch_id) -> list[asyncpg.Record]:
        return await conn.fetch("SELECT wallet_address, amount_far, amount_base FROM far_payment_batch_items "
                                "WHERE batch_id = $1 ORDER BY lower(wallet_address)", batch_id)

    async def _pay_call(self, conn, batch) -> dict[str, Any]:
        """The payBatch(batchId, recipients, amounts) call of a batch: the same for its first send and re-sends."""
        chain = self.chain
        number = batch["batch_number"]
        items = await self._items(conn, batch["batch_id"])
        recipients = [to_checksum_address(row["wallet_address"]) for row in items]
        amounts = [int(row["amount_base"]) for row in items]
        if sum(amounts) != to_base_units(Decimal(batch["total_far"])):
            raise PayoutError(f"batch {number}: items do not add up to total_far")
        data = chain.payout.encode_abi("payBatch", args=[number, recipients, amounts])
        return {"from": chain.address, "to": chain.payout.address, "data": data}

    def _estimate(self, call) -> tuple[int | None, str | None]:
        """(gas limit, None), or (None, why nothing may be sent): the estimate reverts or exceeds the cap."""
        try:
            estimate = self.chain.w3.eth.estimate_gas(call)
        except Exception as error:  # noqa: BLE001 - only reverts are handled here
            if not is_revert(error):
                raise
            return None, f"gas estimate reverted (nothing sent): {error}"
        if estimate > self.gas_cap:
            return None, (f"gas estimate {estimate} exceeds PAYOUT_MAX_GAS {self.gas_cap} (nothing sent; lower "
                          "MAX_RECIPIENTS_PER_TX)")
        return min(estimate * 5 // 4 + 20_000, self.gas_cap), None

    def _sign_call(self, call, gas_limit: int) -> tuple[int, bytes, str]:
        """Sign ``call`` with the payer's next nonce: (nonce, raw transaction, hash)."""
        chain = self.chain
        nonce = chain.w3.eth.get_transaction_count(chain.address, "pending")
        tx = {**call, "gas": gas_limit, "gasPrice": chain.gas_price(), "nonce": nonce, "chainId": chain.chain_id,
              "value": 0}
        del tx["from"]
        signed = chain.account.sign_transaction(tx)
        return nonce, bytes(signed.raw_transaction), "0x" + bytes(signed.hash).hex()

    async def _record_transaction(self, conn, batch, nonce: int, raw: bytes, tx_hash: str, gas_limit: int) -> None:
        await conn.execute("INSERT INTO far_payment_transactions (tx_hash, batch_id, nonce, raw_tx, gas_limit) "
                           "VALUES ($1, $2, $3, $4, $5)", tx_hash, batch["batch_id"], nonce, raw, gas_limit)

    async def _sign(self, conn, batch):
        """planned -> signed: build, estimate (capped), sign; store raw tx + hash + nonce before any broadcast.
        A planned batch that cannot be sent fails: no transaction carries its batchId, so releasing is safe."""
        chain = self.chain
        number = batch["batch_number"]
        if chain.payout.functions.paid(number).call():
            raise PayoutError(f"batch {number} is planned here but already paid on chain by contract "
                              f"{chain.payout.address}: the database and the chain disagree (restored backup?)")
        call = await self._pay_call(conn, batch)
        gas_limit, refused = self._estimate(call)
        if refused:
            return await self._fail(conn, batch, refused)
        nonce, raw, tx_hash = self._sign_call(call, gas_limit)
        async with conn.transaction():
            batch = await self._transition(conn, batch, BatchState.SIGNED, raw_tx=raw, tx_hash=tx_hash, nonce=nonce,
                                           gas_limit=gas_limit, from_address=chain.address, chain_id=chain.chain_id,
                                           contract_address=chain.payout.address, error=None)
            await self._record_transaction(conn, batch, nonce, raw, tx_hash, gas_limit)
        log.info("payouts.batch_signed", batch_number=number, tx_hash=tx_hash, nonce=nonce, gas_limit=gas_limit)
        self._checkpoint(BatchState.SIGNED, number)
        return batch

    def _receipt(self, tx_hash: str):
        try:
            return self.chain.w3.eth.get_transaction_receipt(tx_hash)
        except TransactionNotFound:
            return None

    def _known(self, tx_hash: str) -> bool:
        try:
            self.chain.w3.eth.get_transaction(tx_hash)
            return True
        except TransactionNotFound:
            return False

    async def _transactions(self, conn, batch) -> list[asyncpg.Record]:
        return await conn.fetch("SELECT tx_hash, nonce, raw_tx FROM far_payment_transactions WHERE batch_id = $1 "
                                "ORDER BY nonce, signed_at", batch["batch_id"])

    async def _advance_open(self, conn, batch):
        """signed/submitted -> submitted/confirmed, through as many sends of the SAME batchId as it takes.
        Returns (batch, still_waiting).

        1. One of the batch's transactions succeeded: wait until its receipt is PAYOUT_CONFIRMATIONS deep and
           canonical, then confirmed. 2. One is pending: wait for it. 3. One can still be mined (its nonce is the
           payer's next): broadcast those exact bytes. 4. All its nonces are used (reverted, or taken by other
           transactions) PAYOUT_CONFIRMATIONS deep and the batchId unpaid there: sign a re-send of the same batchId.
        The contract pays a batchId once, so whichever of them a reorg mines, the wallets are paid once.
        """
        chain, number = self.chain, batch["batch_number"]
        sent = await self._transactions(conn, batch)
        if not sent:
            raise PayoutError(f"batch {number} is {batch['state']} but no signed transaction of it is stored")
        receipts = {tx["tx_hash"]: self._receipt(tx["tx_hash"]) for tx in sent}
        if any(receipt is not None for receipt in receipts.values()):
            self._checkpoint("mined", number)  # a receipt is seen, the database does not know it yet
            receipts = {tx["tx_hash"]: self._receipt(tx["tx_hash"]) for tx in sent}
        for tx in sent:
            receipt = receipts[tx["tx_hash"]]
            if receipt is not None and receipt["status"] == 1:
                return await self._settle_success(conn, batch, receipt)
        if chain.payout.functions.paid(number).call():
            raise PayoutError(f"batch {number} is paid on chain by a transaction this database does not hold; "
                              "investigate (another tracker with the same key?)")
        pending = [tx for tx in sent if receipts[tx["tx_hash"]] is None and self._known(tx["tx_hash"])]
        if pending:
            batch = await self._mark_submitted(conn, batch)
            receipt = await self._wait_receipt(pending[-1]["tx_hash"])
            return batch, receipt is None
        next_nonce = chain.w3.eth.get_transaction_count(chain.address, "latest")
        minable = [tx for tx in sent if tx["nonce"] == next_nonce and receipts[tx["tx_hash"]] is None]
        if minable:
            self._broadcast(number, minable[-1])
            return await self._mark_submitted(conn, batch), False
        if all(tx["nonce"] < next_nonce for tx in sent):
            return await self._resend_when_deep(conn, batch, max(tx["nonce"] for tx in sent))
        log.warning("payouts.nonce_gap", batch_number=number, next_nonce=next_nonce)
        return batch, True

    async def _settle_success(self, conn, batch, receipt):
        """A transaction of the batch succeeded: confirmed once PAYOUT_CONFIRMATIONS deep and still a success."""
        number = batch["batch_number"]
        # Nothing is decided before the receipt is PAYOUT_CONFIRMATIONS deep and still canonical: a success can be
        # re-mined as a revert (then the batch is sent again) or dropped (then it is re-broadcast).
        settled = await self._wait_confirmations(receipt)
        if settled is None:
            log.warning("payouts.receipt_not_settled", batch_number=number)
            return batch, False  # look again: re-broadcast or re-send
        receipt, _head = settled
        if receipt["status"] != 1:
            return batch, False
        tx_hash = "0x" + bytes(receipt["transactionHash"]).hex()
        batch = await self._mark_submitted(conn, batch)
        batch = await self._transition(conn, batch, BatchState.CONFIRMED, block_number=receipt["blockNumber"],
                                       gas_used=receipt["gasUsed"], confirmed_at=datetime.now(timezone.utc),
                                       paid_tx_hash=tx_hash, error=None)
        metrics.PAID_FAR.inc(float(batch["total_far"]))
        metrics.PAID_RECIPIENTS.inc(batch["recipient_count"])
        metrics.GAS_USED.inc(receipt["gasUsed"])
        log.info("payouts.batch_confirmed", batch_number=number, tx_hash=tx_hash, block=receipt["blockNumber"],
                 gas_used=receipt["gasUsed"], total_far=str(batch["total_far"]))
        self._checkpoint(BatchState.CONFIRMED, number)
        return batch, False

    def _broadcast(self, number: int, tx) -> None:
        """Send stored bytes again (same nonce, same batchId); "already known" races are re-checked by the caller."""
        try:
            self.chain.w3.eth.send_raw_transaction(bytes(tx["raw_tx"]))
            log.info("payouts.broadcast", batch_number=number, tx_hash=tx["tx_hash"], nonce=tx["nonce"])
        except Exception as error:  # noqa: BLE001
            if not self._known(tx["tx_hash"]) and self._receipt(tx["tx_hash"]) is None:
                raise PayoutError(f"batch {number}: broadcast of {tx['tx_hash']} failed: {error}") from error
        self._checkpoint("broadcast", number)

    async def _mark_submitted(self, conn, batch):
        if batch["state"] != BatchState.SIGNED:
            return batch
        batch = await self._transition(conn, batch, BatchState.SUBMITTED,
                                       submitted_at=batch["submitted_at"] or datetime.now(timezone.utc))
        log.info("payouts.batch_submitted", batch_number=batch["batch_number"], tx_hash=batch["tx_hash"])
        self._checkpoint(BatchState.SUBMITTED, batch["batch_number"])
        return batch

    async def _resend_when_deep(self, conn, batch, last_nonce: int):
        """Every transaction of the batch is unminable at ``latest``. Sign a re-send of the same batchId once that
        is so PAYOUT_CONFIRMATIONS deep (no re-send for a shallow revert a reorg may still undo; safety does not
        depend on it: the contract pays the batchId once)."""
        chain, w3, number = self.chain, self.chain.w3, batch["batch_number"]
        deadline = time.monotonic() + self.receipt_timeout_s + self.confirmations * 10
        while True:
            deep = w3.eth.block_number - self.confirmations
            if deep >= 0 and w3.eth.get_transaction_count(chain.address, deep) > last_nonce:
                break
            if chain.is_local:
                chain.advance(1)
                continue
            if time.monotonic() >= deadline:
                return batch, True
            await asyncio.sleep(self.poll_interval_s)
        if chain.payout.functions.paid(number).call(block_identifier=deep):
            return batch, False  # paid at depth by one of ours after all: the next pass finds its receipt
        gas_limit, refused = self._estimate(await self._pay_call(conn, batch))
        if refused:
            await self._note(conn, batch, f"waiting to send batch {number} again: {refused}")
            return await self._reload(conn, batch), True
        nonce, raw, tx_hash = self._sign_call(await self._pay_call(conn, batch), gas_limit)
        await self._record_transaction(conn, batch, nonce, raw, tx_hash, gas_limit)
        log.warning("payouts.resend", batch_number=number, tx_hash=tx_hash, nonce=nonce)
        self._broadcast(number, {"tx_hash": tx_hash, "nonce": nonce, "raw_tx": raw})
        return await self._mark_submitted(conn, batch), False

    async def _note(self, conn, batch, error: str) -> None:
        log.warning("payouts.batch_waiting", batch_number=batch["batch_number"], reason=error)
        await conn.execute("UPDATE far_payment_batches SET error = $2 WHERE batch_id = $1", batch["batch_id"], error)

    async def _reload(self, conn, batch):
        return await conn.fetchrow("SELECT * FROM far_payment_batches WHERE batch_id = $1", batch["batch_id"])

    def _finalized_block(self) -> int:
        """The newest block no reorg can remove: the node's ``finalized`` block (BSC fast finality), and never
        less than PAYOUT_FINALITY_BLOCKS deep (a local chain's ``finalized`` is its head)."""
        w3 = self.chain.w3
        by_depth = w3.eth.block_number - self.finality_blocks
        if self.chain.is_local:
            return by_depth
        try:
            return min(by_depth, int(w3.eth.get_block("finalized")["number"]))
        except Exception:  # noqa: BLE001 - a node without the tag: depth alone
            return by_depth

    async def _recheck_confirmed(self, conn) -> None:
        """Confirmed batches not yet final: a reorg deeper than PAYOUT_CONFIRMATIONS may have removed their payment.
        Such a batch goes back to submitted (contributions attached) and is driven again; one at finalized depth
        is marked final and no longer read."""
        rows = await conn.fetch("SELECT * FROM far_payment_batches WHERE state = 'confirmed' AND finalized_at IS NULL "
                                "AND network = $1 ORDER BY batch_number", self.network)
        if not rows:
            return
        w3, final = self.chain.w3, self._finalized_block()
        for batch in rows:
            receipt = self._receipt(batch["paid_tx_hash"] or batch["tx_hash"])
            canonical = receipt is not None and receipt["status"] == 1 and \
                w3.eth.get_block(receipt["blockNumber"])["hash"] == receipt["blockHash"]
            if not canonical:
                log.error("payouts.payment_reorged_out", batch_number=batch["batch_number"])
                await self._transition(conn, batch, BatchState.SUBMITTED, paid_tx_hash=None, block_number=None,
                                       error="its payment was removed by a reorg; sending it again (same batchId)")
                metrics.FAILURES.labels("reorg").inc()
            elif receipt["blockNumber"] <= final:
                await conn.execute("UPDATE far_payment_batches SET finalized_at = now(), block_number = $2 "
                                   "WHERE batch_id = $1", batch["batch_id"], receipt["blockNumber"])
            elif receipt["blockNumber"] != batch["block_number"]:
                await conn.execute("UPDATE far_payment_batches SET block_number = $2 WHERE batch_id = $1",
                                   batch["batch_id"], receipt["blockNumber"])

    async def _wait_receipt(self, tx_hash: str):
        deadline = time.monotonic() + self.receipt_timeout_s
        while True:
            receipt = self._receipt(tx_hash)
            if receipt is not None or time.monotonic() >= deadline:
                return receipt
            await asyncio.sleep(self.poll_interval_s)

    async def _wait_confirmations(self, receipt):
        """Wait until the receipt is ``confirmations`` blocks deep and its block is still canonical.

        Returns (receipt re-read at that depth, head block number) or None (dropped by a reorg, or timeout: the batch
        stays submitted and the next run resumes it). A receipt that moved to another block (reorg) restarts the
        wait from its new block; the caller decides from the status of the *returned* receipt only.
        """
        chain, w3 = self.chain, self.chain.w3
        deadline = time.monotonic() + self.receipt_timeout_s + self.confirmations * 10
        while True:
            head = w3.eth.block_number
            depth = head - receipt["blockNumber"]
            if depth >= self.confirmations:
                current = self._receipt(receipt["transactionHash"])
                if current is None:
                    return None  # reorged out: back to waiting (the next run rebroadcasts if needed)
                if current["blockHash"] == receipt["blockHash"] and \
                        w3.eth.get_block(current["blockNumber"])["hash"] == current["blockHash"]:
                    return current, head
                receipt = current
                continue
            if chain.is_local:
                chain.advance(self.confirmations - depth)
                continue
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(self.poll_interval_s)

    async def _transition(self, conn, batch, to: str, **columns):
        """The one place a batch changes state: checks TRANSITIONS, updates the row only if it is still in the state
        it was read in (and sets ``columns``); -> failed also releases the contributions, in the same transaction."""
        number, current = batch["batch_number"], batch["state"]
        if to not in TRANSITIONS.get(current, frozenset()):
            raise PayoutError(f"batch {number}: illegal state change {current} -> {to}")
        names = list(columns)
        assignments = "".join(f", {name} = ${index}" for index, name in enumerate(names, start=4))
        async with conn.transaction():
            row = await conn.fetchrow(
                f"UPDATE far_payment_batches SET state = $2{assignments} WHERE batch_id = $1 AND state = $3 RETURNING *",
                batch["batch_id"], to, current, *columns.values())
            if row is None:
                raise PayoutError(f"batch {number} is no longer {current}; not moved to {to}")
            if to == BatchState.FAILED:
                released = await conn.execute("UPDATE far_session_contributions SET payment_batch_id = NULL "
                                              "WHERE payment_batch_id = $1", batch["batch_id"])
                log.info("payouts.contributions_released", batch_number=number, released=released)
        return row

    async def _fail(self, conn, batch, reason: str):
        """-> failed, releasing the contributions (payment_batch_id = NULL) in the same transaction. The next run
        plans them again (never the run that released them)."""
        batch = await self._transition(conn, batch, BatchState.FAILED, error=reason)
        self.released = True
        metrics.FAILURES.labels("batch").inc()
        log.error("payouts.batch_failed", batch_number=batch["batch_number"], reason=reason)
        self._checkpoint(BatchState.FAILED, batch["batch_number"])
        return batch


class _Rollback(Exception):
    """Nothing attached (plan raced with another change): roll the empty batch back."""

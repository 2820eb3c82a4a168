"""The crash-safe payout state machine (docs/payouts.md).

A batch moves::

    planned --sign--> signed --broadcast--> submitted --receipt + PAYOUT_CONFIRMATIONS--> confirmed
       \\                 \\                      \\--reverted--> failed (contributions released)
        \\--estimate reverts-> failed              \\--nonce taken by another tx--> failed

* **planned**: the batch row, its items and the attachment of its contributions (``payment_batch_id``) are
  written in ONE database transaction, so contributions are either in exactly one open batch or free.
* **signed**: raw transaction, hash, nonce, gas limit (and chain id + contract) are stored *before* the first
  broadcast. From here on the batch is only ever paid by this exact raw transaction: it is never re-signed.
* **submitted**: the node has the transaction. **confirmed**: mined with status 1, and that receipt, re-read once
  ``PAYOUT_CONFIRMATIONS`` blocks are on top, is still in a canonical block. **failed**: reverted — decided the
  same way, from a receipt ``PAYOUT_CONFIRMATIONS`` deep and canonical, never from a fresh one (a reorg can re-mine
  a revert as a success) — or its nonce was consumed by another transaction (nonce and ``paid()`` read at one block
  ``PAYOUT_CONFIRMATIONS`` deep), so it can never be mined; its contributions get ``payment_batch_id = NULL`` in
  the same database transaction and are planned again by the *next* run, never by the run that released them.

Every state change goes through ``PayoutExecutor._transition`` and the table ``TRANSITIONS``; the database
enforces the same table and refuses to detach the contributions of a batch that is not failed
(migration ``0004_payout_guards``).

A run takes a PostgreSQL advisory lock (a second tracker skips), first resumes every open batch (a signed
batch already on chain is just awaited; one the node does not know is re-broadcast, same bytes), and plans
new batches only when nothing is left open. A crash anywhere therefore leaves a state the next run finishes,
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
TRANSITIONS: dict[BatchState, frozenset[BatchState]] = {
    BatchState.PLANNED: frozenset({BatchState.SIGNED, BatchState.FAILED}),
    BatchState.SIGNED: frozenset({BatchState.SUBMITTED, BatchState.FAILED}),
    BatchState.SUBMITTED: frozenset({BatchState.CONFIRMED, BatchState.FAILED}),
    BatchState.CONFIRMED: frozenset(),
    BatchState.FAILED: frozenset(),
}
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
                 receipt_timeout_s: float = 180.0, poll_interval_s: float | None = None,
                 crash_at: str | None = None) -> None:
        self.postgres_url = postgres_url
        self.chain = chain
        self.network = network
        self.min_payout_far = Decimal(min_payout_far)
        self.gas_cap = gas_cap
        self.max_recipients = max_recipients_for_gas(gas_cap, max_recipients)
        self.confirmations = confirmations
        self.receipt_timeout_s = receipt_timeout_s
        local = chain is not None and chain.is_local
        self.poll_interval_s = poll_interval_s if poll_interval_s is not None else (0.05 if local else 2.0)
        self._crash_points = CrashPoints("payouts.crash_injected", crash_at, CRASH_ENV)
        self.released = False  # a batch failed (released its contributions) in this run: plan nothing more

    @classmethod
    def from_settings(cls, settings, chain: Chain | None, *, network: str | None = None, **overrides):
        kwargs = dict(network=network or settings.BSC_NETWORK, min_payout_far=settings.MIN_PAYOUT_FAR,
                      max_recipients=settings.MAX_RECIPIENTS_PER_TX, gas_cap=settings.PAYOUT_MAX_GAS,
                      confirmations=settings.PAYOUT_CONFIRMATIONS)
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
        while batch["state"] in OPEN_BATCH_STATES:
            if batch["state"] == BatchState.PLANNED:
                batch = await self._sign(conn, batch)
            else:
                batch, waiting = await self._advance_signed(conn, batch)
                if waiting:
                    break
        outcome = BatchOutcome(str(batch["batch_id"]), number, batch["state"], Decimal(batch["total_far"]),
                               batch["recipient_count"], batch["tx_hash"], batch["block_number"], batch["error"],
                               resumed)
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

    async def _sign(self, conn, batch):
        """planned -> signed: build, estimate (capped), sign; store raw tx + hash + nonce before any broadcast."""
        chain, w3 = self.chain, self.chain.w3
        number = batch["batch_number"]
        if chain.payout.functions.paid(number).call():
            raise PayoutError(f"batch {number} is planned here but already paid on chain by contract "
                              f"{chain.payout.address}: the database and the chain disagree (restored backup?)")
        items = await self._items(conn, batch["batch_id"])
        recipients = [to_checksum_address(row["wallet_address"]) for row in items]
        amounts = [int(row["amount_base"]) for row in items]
        if sum(amounts) != to_base_units(Decimal(batch["total_far"])):
            raise PayoutError(f"batch {number}: items do not add up to total_far")
        data = chain.payout.encode_abi("payBatch", args=[number, recipients, amounts])
        call = {"from": chain.address, "to": chain.payout.address, "data": data}
        try:
            estimate = w3.eth.estimate_gas(call)
        except Exception as error:  # noqa: BLE001 - only reverts are handled here
            if not is_revert(error):
                raise
            return await self._fail(conn, batch, f"gas estimate reverted (nothing sent): {error}")
        gas_limit = min(estimate * 5 // 4 + 20_000, self.gas_cap)
        if estimate > self.gas_cap:
            return await self._fail(conn, batch, f"gas estimate {estimate} exceeds PAYOUT_MAX_GAS {self.gas_cap} "
                                                 "(nothing sent; lower MAX_RECIPIENTS_PER_TX)")
        nonce = w3.eth.get_transaction_count(chain.address, "pending")
        tx = {**call, "gas": gas_limit, "gasPrice": chain.gas_price(), "nonce": nonce, "chainId": chain.chain_id,
              "value": 0}
        del tx["from"]
        signed = chain.account.sign_transaction(tx)
        tx_hash = "0x" + bytes(signed.hash).hex()
        batch = await self._transition(conn, batch, BatchState.SIGNED, raw_tx=bytes(signed.raw_transaction),
                                       tx_hash=tx_hash, nonce=nonce, gas_limit=gas_limit, from_address=chain.address,
                                       chain_id=chain.chain_id, contract_address=chain.payout.address, error=None)
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

    async def _advance_signed(self, conn, batch):
        """signed/submitted -> submitted/confirmed/failed. Returns (batch, still_waiting)."""
        chain = self.chain
        number, tx_hash = batch["batch_number"], batch["tx_hash"]
        if self._receipt(tx_hash) is None and not self._known(tx_hash):
            nonce_state, block = await self._nonce_state(batch)
            if nonce_state == "wait":
                log.warning("payouts.nonce_used_not_deep", batch_number=number, nonce=batch["nonce"])
                return batch, True
            if nonce_state == "taken":
                # Our nonce was used by another transaction, PAYOUT_CONFIRMATIONS deep: this raw tx can never be
                # mined. paid() is read at the same block as the nonce.
                if chain.payout.functions.paid(number).call(block_identifier=block):
                    raise PayoutError(f"batch {number}: its nonce was used by another transaction and the contract "
                                      "says the batchId is paid; investigate before releasing")
                return await self._fail(conn, batch, f"nonce {batch['nonce']} was used by another transaction "
                                                     f"(block {block}); this batch was never mined"), False
            if nonce_state == "free":
                try:
                    chain.w3.eth.send_raw_transaction(bytes(batch["raw_tx"]))
                    log.info("payouts.broadcast", batch_number=number, tx_hash=tx_hash,
                             rebroadcast=batch["state"] != BatchState.SIGNED)
                except Exception as error:  # noqa: BLE001 - "already known" races; re-checked below
                    if not self._known(tx_hash) and self._receipt(tx_hash) is None:
                        raise PayoutError(f"batch {number}: broadcast of {tx_hash} failed: {error}") from error
                self._checkpoint("broadcast", number)
        if batch["state"] == BatchState.SIGNED:
            batch = await self._transition(conn, batch, BatchState.SUBMITTED,
                                           submitted_at=batch["submitted_at"] or datetime.now(timezone.utc))
            log.info("payouts.batch_submitted", batch_number=number, tx_hash=tx_hash)
            self._checkpoint(BatchState.SUBMITTED, number)
        receipt = await self._wait_receipt(tx_hash)
        if receipt is None:
            log.warning("payouts.receipt_timeout", batch_number=number, tx_hash=tx_hash)
            return batch, True
        self._checkpoint("mined", number)
        # Whatever the first receipt said, nothing is decided before it is PAYOUT_CONFIRMATIONS deep and still
        # canonical: a revert can be re-mined as a success (releasing it would pay twice) and a success as a revert.
        settled = await self._wait_confirmations(receipt)
        if settled is None:
            log.warning("payouts.receipt_not_settled", batch_number=number, tx_hash=tx_hash)
            return batch, True
        receipt, head = settled
        if receipt["status"] != 1:
            if chain.payout.functions.paid(number).call(block_identifier=head - self.confirmations):
                raise PayoutError(f"batch {number}: transaction {tx_hash} reverted but the contract says the batchId "
                                  "is paid; investigate before releasing")
            return await self._fail(conn, batch, f"transaction {tx_hash} reverted in block {receipt['blockNumber']} "
                                                 f"({head - receipt['blockNumber']} confirmations)"), False
        batch = await self._transition(conn, batch, BatchState.CONFIRMED, block_number=receipt["blockNumber"],
                                       gas_used=receipt["gasUsed"], confirmed_at=datetime.now(timezone.utc), error=None)
        metrics.PAID_FAR.inc(float(batch["total_far"]))
        metrics.PAID_RECIPIENTS.inc(batch["recipient_count"])
        metrics.GAS_USED.inc(receipt["gasUsed"])
        log.info("payouts.batch_confirmed", batch_number=number, tx_hash=tx_hash, block=receipt["blockNumber"],
                 gas_used=receipt["gasUsed"], total_far=str(batch["total_far"]))
        self._checkpoint(BatchState.CONFIRMED, number)
        return batch, False

    async def _nonce_state(self, batch) -> tuple[str, int | None]:
        """Our transaction is neither mined nor known to the node: is its nonce still free?

        Returns ("free", None) — not used at ``latest``: (re)broadcast; ("ours", None) — our own transaction
        showed up meanwhile; ("taken", block) — used by another transaction at ``block``, PAYOUT_CONFIRMATIONS
        deep (never decided from ``latest`` alone: a reorg can drop the other transaction and mine ours);
        ("wait", None) — used at ``latest`` but not yet deep enough; the next run looks again.
        """
        chain, w3 = self.chain, self.chain.w3
        sender, nonce, tx_hash = batch["from_address"], batch["nonce"], batch["tx_hash"]
        deadline = time.monotonic() + self.receipt_timeout_s + self.confirmations * 10
        while True:
            head = w3.eth.block_number
            if w3.eth.get_transaction_count(sender, head) <= nonce:
                return "free", None
            deep = head - self.confirmations
            if deep >= 0 and w3.eth.get_transaction_count(sender, deep) > nonce:
                if self._receipt(tx_hash) is not None:
                    return "ours", None
                return "taken", deep
            if self._receipt(tx_hash) is not None or self._known(tx_hash):
                return "ours", None
            if chain.is_local:
                chain.advance(1)
                continue
            if time.monotonic() >= deadline:
                return "wait", None
            await asyncio.sleep(self.poll_interval_s)

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

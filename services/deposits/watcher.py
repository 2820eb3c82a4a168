"""The deposit watcher: credits accounts for final ``FarDeposit.Deposit`` events, exactly once.

A user calls ``FarDeposit.deposit(accountRef, amount)`` (after ``approve`` on the FAR token); the contract moves the
FAR to the treasury and emits ``Deposit(bytes32 indexed accountRef, address indexed from, uint256 amount)``.

A run (``run_once``):

1. takes a PostgreSQL advisory lock (a second watcher skips);
2. reads the cursor of (chain id, contract): the last block fully processed and its hash. If that block's hash is no
   longer the canonical one, the chain reorganised deeper than ``PAYOUT_CONFIRMATIONS``. When every recorded
   deposit is still in its recorded block, the cursor goes back to the newest of them and the blocks after it are
   scanned again (what is already recorded hits the unique key; a deposit re-mined in the new branch is credited
   once). When a recorded (credited) deposit is gone, the watcher refuses to go on (``DepositReorgError``) and
   ``far-mesh audit`` shows it — nothing is credited twice or un-credited behind an operator's back;
3. scans only **final** blocks, ``head − PAYOUT_CONFIRMATIONS`` and older, in chunks. A deposit that is mined and
   then disappears in a reorg before it is that deep is never seen, so never credited;
4. per chunk, ONE database transaction inserts each event into ``far_deposits`` (unique on
   ``(chain_id, tx_hash, log_index)``, ``ON CONFLICT DO NOTHING``), credits the named account through
   ``far_credit_account()`` (balance + append-only ledger row) only when the row was new, and moves the cursor
   (compare-and-set on the old value). A crash anywhere before the commit leaves nothing; after it, the cursor has
   moved and a re-scan would hit the unique key anyway.

An ``accountRef`` that is not an account's UUID (right-aligned in the bytes32) or names no account is recorded as
``unmatched``: the FAR is in the treasury, nobody is credited, and the operator settles it by hand.

``FAR_MESH_DEPOSITS_CRASH_AT=<checkpoint>[:n]`` (tests only) SIGKILLs the process at the n-th time a checkpoint is
reached: ``scanned`` (logs read, nothing written), ``credited`` (inside the transaction, credits written, cursor
not moved), ``cursor`` (cursor moved, not committed), ``committed`` (after the commit).
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Optional

import asyncpg
from eth_utils import keccak, to_checksum_address

from services.common.crash_points import CrashPoints, InjectedCrash  # noqa: F401  (InjectedCrash: for tests)
from services.common.logs import get_logger
from services.common.money import from_base_units
from services.common.states import DepositState
from services.deposits import metrics

log = get_logger(__name__)

DEPOSIT_TOPIC = "0x" + keccak(text="Deposit(bytes32,address,uint256)").hex()
ADVISORY_LOCK_KEY = int.from_bytes(hashlib.sha256(b"far-mesh:deposits").digest()[:8], "big", signed=True)
CHECKPOINTS = ("scanned", "credited", "cursor", "committed")
CRASH_ENV = "FAR_MESH_DEPOSITS_CRASH_AT"
DEFAULT_CHUNK = 2_000


class DepositError(RuntimeError):
    """The watcher cannot go on safely (configuration, or a state an operator must look at)."""


class DepositReorgError(DepositError):
    """A block the watcher already processed is no longer canonical: a reorg deeper than the confirmations."""


# ------------------------------------------------------------------------------------------- account refs


def account_ref(account_id: str | uuid.UUID) -> str:
    """The bytes32 ``accountRef`` of an account: its UUID's 16 bytes right-aligned (``0x`` + 32 zeros + 32 hex)."""
    return "0x" + "00" * 16 + uuid.UUID(str(account_id)).hex


def account_ref_bytes(account_id: str | uuid.UUID) -> bytes:
    return bytes.fromhex(account_ref(account_id)[2:])


def account_from_ref(ref: str) -> Optional[uuid.UUID]:
    """The account UUID an ``accountRef`` names, or None when it is not of the form ``account_ref`` writes."""
    body = ref[2:] if ref.startswith("0x") else ref
    if len(body) != 64 or body[:32] != "0" * 32:
        return None
    try:
        return uuid.UUID(hex=body[32:])
    except ValueError:
        return None


def _hex(value: Any) -> str:
    if isinstance(value, str):
        return value.lower() if value.startswith("0x") else "0x" + value.lower()
    return "0x" + bytes(value).hex()


@dataclass(frozen=True)
class DepositEvent:
    tx_hash: str
    log_index: int
    block_number: int
    block_hash: str
    account_ref: str
    from_address: str
    amount_base: int

    @property
    def amount_far(self) -> Decimal:
        return from_base_units(self.amount_base)


def decode_deposit_log(entry: Any) -> DepositEvent:
    topics = [_hex(t) for t in entry["topics"]]
    if len(topics) != 3 or topics[0] != DEPOSIT_TOPIC:
        raise DepositError(f"not a Deposit event: {topics}")
    return DepositEvent(tx_hash=_hex(entry["transactionHash"]), log_index=int(entry["logIndex"]),
                        block_number=int(entry["blockNumber"]), block_hash=_hex(entry["blockHash"]),
                        account_ref=topics[1], from_address=to_checksum_address("0x" + topics[2][-40:]),
                        amount_base=int.from_bytes(bytes(entry["data"]), "big"))


def fetch_deposit_logs(chain, contract_address: str, from_block: int, to_block: int) -> list[DepositEvent]:
    logs = chain.w3.eth.get_logs({"address": to_checksum_address(contract_address), "topics": [DEPOSIT_TOPIC],
                                  "fromBlock": from_block, "toBlock": to_block})
    return sorted((decode_deposit_log(entry) for entry in logs), key=lambda e: (e.block_number, e.log_index))


# ------------------------------------------------------------------------------------------------ watcher


@dataclass
class Credit:
    deposit_id: int
    account_id: Optional[str]
    amount_far: Decimal
    tx_hash: str
    log_index: int
    state: str


@dataclass
class ScanReport:
    safe_head: int = -1
    from_block: Optional[int] = None
    to_block: Optional[int] = None
    credited: list[Credit] = field(default_factory=list)
    unmatched: list[Credit] = field(default_factory=list)
    already_known: int = 0
    skipped: Optional[str] = None

    @property
    def credited_far(self) -> Decimal:
        return sum((c.amount_far for c in self.credited), Decimal(0))


class DepositWatcher:
    def __init__(self, postgres_url: str, chain, *, confirmations: int, contract_address: Optional[str] = None,
                 start_block: int = 0, chunk: int = DEFAULT_CHUNK, crash_at: Optional[str] = None):
        contract = contract_address or (chain.deposit.address if getattr(chain, "deposit", None) else None)
        if not contract:
            raise DepositError("DEPOSIT_CONTRACT_ADDRESS: required to watch deposits (deploy with "
                               "`far-mesh chain deploy`)")
        self.postgres_url = postgres_url
        self.chain = chain
        self.contract = contract.lower()
        self.confirmations = confirmations
        self.start_block = start_block
        self.chunk = max(1, chunk)
        self._checkpoint = CrashPoints("deposits.crash_injected", crash_at, CRASH_ENV)  # called where it may crash

    @classmethod
    def from_settings(cls, settings, chain, **overrides) -> "DepositWatcher":
        kwargs = dict(confirmations=settings.PAYOUT_CONFIRMATIONS, contract_address=settings.DEPOSIT_CONTRACT_ADDRESS
                      or None, start_block=settings.DEPOSIT_START_BLOCK)
        kwargs.update(overrides)
        return cls(settings.POSTGRES_URL, chain, **kwargs)

    def _block_hash(self, number: int) -> str:
        return _hex(self.chain.w3.eth.get_block(number)["hash"])

    async def run_once(self) -> ScanReport:
        report = ScanReport()
        chain_id = self.chain.chain_id
        conn = await asyncpg.connect(self.postgres_url)
        try:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", ADVISORY_LOCK_KEY):
                report.skipped = "another deposit watcher holds the lock"
                return report
            try:
                await self._run(conn, chain_id, report)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
        except InjectedCrash:
            conn.terminate()  # like a killed process: the server sees the connection drop
            raise
        finally:
            if not conn.is_closed():
                await conn.close()
        metrics.RUNS.labels("skipped" if report.skipped else "ok").inc()
        return report

    async def _run(self, conn, chain_id: int, report: ScanReport) -> None:
        head = self.chain.w3.eth.block_number
        safe = head - self.confirmations
        report.safe_head = safe
        cursor = await conn.fetchrow("SELECT last_block, last_block_hash FROM far_deposit_cursors "
                                     "WHERE chain_id = $1 AND contract_address = $2", chain_id, self.contract)
        last = cursor["last_block"] if cursor else self.start_block - 1
        if cursor and cursor["last_block_hash"] and last >= 0:
            if last > head or self._block_hash(last) != cursor["last_block_hash"]:
                metrics.RUNS.labels("reorg").inc()
                last = await self._rewind(conn, chain_id, last, head)
        while last < safe:
            start, end = last + 1, min(safe, last + self.chunk)
            events = fetch_deposit_logs(self.chain, self.contract, start, end)
            end_hash = self._block_hash(end)
            for event in events:  # every event must come from the canonical chain (guards a racing node)
                if self._block_hash(event.block_number) != event.block_hash:
                    raise DepositError(f"log {event.tx_hash}:{event.log_index} is from a non-canonical block; "
                                       "retry later")
            self._checkpoint("scanned")
            async with conn.transaction():
                for event in events:
                    credit = await self._record(conn, chain_id, event)
                    if credit is None:
                        report.already_known += 1
                    elif credit.state == DepositState.CREDITED:
                        report.credited.append(credit)
                    else:
                        report.unmatched.append(credit)
                self._checkpoint("credited")
                moved = await conn.fetchval(
                    """INSERT INTO far_deposit_cursors (chain_id, contract_address, last_block, last_block_hash)
                       VALUES ($1, $2, $3, $4)
                       ON CONFLICT (chain_id, contract_address) DO UPDATE
                          SET last_block = excluded.last_block, last_block_hash = excluded.last_block_hash,
                              updated_at = now()
                        WHERE far_deposit_cursors.last_block = $5
                       RETURNING last_block""", chain_id, self.contract, end, end_hash, last)
                if moved is None:
                    raise DepositError("the deposit cursor moved under this watcher (another watcher without the "
                                       "lock?); nothing of this chunk was committed")
                self._checkpoint("cursor")
            self._checkpoint("committed")
            report.from_block = start if report.from_block is None else report.from_block
            report.to_block = end
            last = end
            metrics.LAST_BLOCK.set(end)
        for credit in report.credited:
            metrics.CREDITED.inc()
            metrics.CREDITED_FAR.inc(float(credit.amount_far))
        metrics.UNMATCHED.inc(len(report.unmatched))
        if report.credited or report.unmatched:
            log.info("deposits.credited", count=len(report.credited), far=str(report.credited_far),
                     unmatched=len(report.unmatched), to_block=report.to_block)

    async def _rewind(self, conn, chain_id: int, last: int, head: int) -> int:
        """The cursor's block is no longer canonical: a reorg deeper than PAYOUT_CONFIRMATIONS. If every recorded
        deposit is still where it was recorded, scan again from the newest of them (a block still canonical, so the
        fork is above it; re-scanned events hit the unique key): deposits of the new branch are credited once. If a
        recorded deposit is gone from its block, stop: it was credited and an operator must settle it."""
        newest = await conn.fetchrow("SELECT block_number, block_hash FROM far_deposits WHERE chain_id = $1 AND "
                                     "contract_address = $2 ORDER BY block_number DESC LIMIT 1", chain_id, self.contract)
        if newest is not None and (newest["block_number"] > head
                                   or self._block_hash(newest["block_number"]) != newest["block_hash"]):
            raise DepositReorgError(
                f"block {last} was processed but the chain now differs (head {head}), and the deposit recorded in "
                f"block {newest['block_number']} is no longer there: a reorganisation deeper than "
                f"PAYOUT_CONFIRMATIONS={self.confirmations}. Nothing more is credited; run `far-mesh audit` and settle "
                "the deposits it reports by hand")
        target = newest["block_number"] if newest is not None else self.start_block - 1
        moved = await conn.fetchval(
            "UPDATE far_deposit_cursors SET last_block = $3, last_block_hash = $4, updated_at = now() "
            "WHERE chain_id = $1 AND contract_address = $2 AND last_block = $5 RETURNING last_block",
            chain_id, self.contract, target, self._block_hash(target) if target >= 0 else None, last)
        if moved is None:
            raise DepositError("the deposit cursor moved under this watcher (another watcher without the lock?)")
        log.error("deposits.rewound", from_block=last, to_block=target, head=head)
        return target

    async def _record(self, conn, chain_id: int, event: DepositEvent) -> Optional[Credit]:
        account = account_from_ref(event.account_ref)
        if account is not None and not await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM far_accounts WHERE account_id = $1)", account):
            account = None
        state = DepositState.CREDITED if account is not None else DepositState.UNMATCHED
        deposit_id = await conn.fetchval(
            """INSERT INTO far_deposits (chain_id, contract_address, tx_hash, log_index, block_number, block_hash,
                   account_ref, account_id, from_address, amount_base, amount_far, state)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
               ON CONFLICT (chain_id, tx_hash, log_index) DO NOTHING RETURNING deposit_id""",
            chain_id, self.contract, event.tx_hash, event.log_index, event.block_number, event.block_hash,
            event.account_ref, account, event.from_address, Decimal(event.amount_base), event.amount_far, state)
        if deposit_id is None:
            return None  # this event was recorded (and, if matched, credited) before
        if account is not None:
            await conn.execute("SELECT far_credit_account($1, $2, 'deposit', $3, $4)", account, event.amount_far,
                               deposit_id, f"{event.tx_hash}:{event.log_index}")
        else:
            log.warning("deposits.unmatched", tx_hash=event.tx_hash, log_index=event.log_index,
                        account_ref=event.account_ref, amount_far=str(event.amount_far))
        return Credit(deposit_id, str(account) if account else None, event.amount_far, event.tx_hash,
                      event.log_index, state)

    async def watch(self, interval_s: float, stop: Optional[asyncio.Event] = None) -> None:
        """Run ``run_once`` every ``interval_s`` until ``stop`` is set; errors are logged and retried."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                await self.run_once()
            except DepositReorgError as error:
                log.error("deposits.reorg", error=str(error))
            except Exception as error:  # noqa: BLE001 - logged, retried at the next tick
                metrics.RUNS.labels("error").inc()
                log.error("deposits.run_failed", error=f"{type(error).__name__}: {error}")
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
            except asyncio.TimeoutError:
                pass


# ------------------------------------------------------------------------------------- sending (local, tests)


def send_from(chain, account, tx: dict) -> Any:
    """Sign ``tx`` with ``account`` (a LocalAccount), send it and wait for a successful receipt."""
    w3 = chain.w3
    tx = {key: tx[key] for key in ("to", "data", "value", "gas") if key in tx}
    tx.update({"from": account.address, "chainId": chain.chain_id, "gasPrice": chain.gas_price(),
               "nonce": w3.eth.get_transaction_count(account.address, "pending")})
    if "gas" not in tx:
        tx["gas"] = int(w3.eth.estimate_gas(tx) * 1.2) + 10_000
    signed = account.sign_transaction(tx)
    tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=180)
    if receipt["status"] != 1:
        raise RuntimeError(f"transaction {tx_hash.hex()} reverted")
    return receipt


def deposit(chain, account, account_id: str, amount_base: int) -> Any:
    """What a user's wallet does: ``approve(FarDeposit, amount)`` then ``deposit(accountRef, amount)``."""
    send_from(chain, account, chain.token.functions.approve(chain.deposit.address, amount_base).build_transaction(
        {"from": account.address}))
    return send_from(chain, account, chain.deposit.functions.deposit(account_ref_bytes(account_id), amount_base)
                     .build_transaction({"from": account.address}))

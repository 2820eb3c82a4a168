"""Weekly payout planning: what each wallet is owed, who is paid now, how the payments split into batches.

Network-free: it reads PostgreSQL (one aggregate query, the work is done by the database) and otherwise is
pure functions over :class:`WalletDue` rows, so it is easy to test and to benchmark.

Eligible (docs/payouts.md "What is paid"): contributions of *finalized* sessions finalized before the cutoff, of a registered
node (``node_id`` not null), with a wallet, a positive ``payment_far``, not disputed (a failed spot check: docs/verification.md) and no
``payment_batch_id`` yet. They are
grouped by wallet (case-insensitively; paid to the EIP-55 checksummed address). A wallet owed at least
``MIN_PAYOUT_FAR`` is paid; a smaller amount carries over to the next week (its contributions stay unattached).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Iterable, Sequence

from eth_utils import to_checksum_address

from services.common.money import format_far, to_base_units

ZERO_ADDRESS = "0x" + "0" * 40

# Gas of one payBatch: fixed part, and the worst case per recipient (a new recipient costs ~27.4k with
# FarPayout + FarToken; other BEP-20 tokens can cost more). Used to keep a batch under PAYOUT_MAX_GAS.
BATCH_BASE_GAS = 60_000
WORST_GAS_PER_RECIPIENT = 40_000

# The eligible contributions, one row per wallet. Mirrored (same WHERE) by ATTACH_SQL in executor.py.
ELIGIBLE_WHERE = """
        c.payment_batch_id IS NULL
    AND c.node_id IS NOT NULL
    AND c.wallet_address IS NOT NULL
    AND c.payment_far > 0
    AND c.disputed_at IS NULL
    AND c.held_at IS NULL
    AND s.finalized_at IS NOT NULL
    AND s.finalized_at < $1
"""

DUES_SQL = f"""
SELECT lower(c.wallet_address)         AS wallet,
       sum(c.payment_far)              AS amount_far,
       count(DISTINCT c.session_id)    AS session_count,
       count(*)                        AS contribution_count
FROM far_session_contributions c
JOIN far_mesh_sessions s ON s.session_id = c.session_id
WHERE {ELIGIBLE_WHERE}
GROUP BY lower(c.wallet_address)
"""


@dataclass(frozen=True)
class WalletDue:
    """What one wallet is owed by its unpaid eligible contributions."""

    wallet: str  # EIP-55 checksummed
    amount_far: Decimal
    session_count: int = 0
    contribution_count: int = 0

    @property
    def amount_base(self) -> int:
        return to_base_units(self.amount_far)


@dataclass(frozen=True)
class PlannedBatch:
    items: tuple[WalletDue, ...]

    @property
    def total_far(self) -> Decimal:
        return sum((item.amount_far for item in self.items), Decimal(0))

    @property
    def recipients(self) -> list[str]:
        return [item.wallet for item in self.items]

    @property
    def amounts_base(self) -> list[int]:
        return [item.amount_base for item in self.items]


@dataclass(frozen=True)
class Plan:
    cutoff: datetime | None
    min_payout_far: Decimal
    batches: tuple[PlannedBatch, ...]
    carried_over: tuple[WalletDue, ...]
    skipped: tuple[WalletDue, ...] = field(default=())  # unpayable wallets (the zero address)

    @property
    def payable(self) -> list[WalletDue]:
        return [item for batch in self.batches for item in batch.items]

    @property
    def total_far(self) -> Decimal:
        return sum((batch.total_far for batch in self.batches), Decimal(0))

    @property
    def carried_over_far(self) -> Decimal:
        return sum((item.amount_far for item in self.carried_over), Decimal(0))

    @property
    def recipient_count(self) -> int:
        return sum(len(batch.items) for batch in self.batches)


def max_recipients_for_gas(gas_cap: int, configured_max: int) -> int:
    """How many recipients fit one transaction under ``gas_cap`` (worst case), capped by configuration."""
    by_gas = max(1, (gas_cap - BATCH_BASE_GAS) // WORST_GAS_PER_RECIPIENT)
    return max(1, min(configured_max, by_gas))


def plan_payouts(dues: Iterable[WalletDue], *, min_payout_far: Decimal, max_recipients: int,
                 cutoff: datetime | None = None) -> Plan:
    """Split wallets into paid now (>= minimum, in batches of at most ``max_recipients``) and carried over.

    Deterministic: wallets are ordered by address (case-insensitive), so the same dues give the same batches.
    Duplicate wallets (different letter case) are merged.
    """
    if max_recipients < 1:
        raise ValueError("max_recipients must be >= 1")
    if not isinstance(min_payout_far, Decimal) or min_payout_far < 0:
        raise ValueError("min_payout_far must be a non-negative Decimal")
    merged: dict[str, WalletDue] = {}
    for due in dues:
        key = due.wallet.lower()
        previous = merged.get(key)
        if previous is not None:
            due = WalletDue(to_checksum_address(key), previous.amount_far + due.amount_far,
                            previous.session_count + due.session_count,
                            previous.contribution_count + due.contribution_count)
        merged[key] = WalletDue(to_checksum_address(key), due.amount_far, due.session_count, due.contribution_count)
    paid: list[WalletDue] = []
    carried: list[WalletDue] = []
    skipped: list[WalletDue] = []
    for key in sorted(merged):
        due = merged[key]
        to_base_units(due.amount_far)  # validates the precision
        if key == ZERO_ADDRESS:
            skipped.append(due)
        elif due.amount_far <= 0:
            continue
        elif due.amount_far >= min_payout_far:
            paid.append(due)
        else:
            carried.append(due)
    batches = tuple(PlannedBatch(tuple(paid[i:i + max_recipients])) for i in range(0, len(paid), max_recipients))
    return Plan(cutoff=cutoff, min_payout_far=min_payout_far, batches=batches, carried_over=tuple(carried),
                skipped=tuple(skipped))


async def load_dues(conn, cutoff: datetime) -> list[WalletDue]:
    """Aggregate the eligible contributions per wallet in SQL (asyncpg connection)."""
    rows = await conn.fetch(DUES_SQL, cutoff)
    return [WalletDue(to_checksum_address(row["wallet"]), Decimal(row["amount_far"]), int(row["session_count"]),
                      int(row["contribution_count"])) for row in rows]


async def build_plan(conn, *, cutoff: datetime, min_payout_far: Decimal, max_recipients: int) -> Plan:
    return plan_payouts(await load_dues(conn, cutoff), min_payout_far=min_payout_far,
                        max_recipients=max_recipients, cutoff=cutoff)


def rows_for_table(plan: Plan) -> Sequence[tuple[int, str, str, int]]:
    """(batch index, wallet, amount, sessions) rows for the CLI table."""
    return [(index, item.wallet, format_far(item.amount_far), item.session_count)
            for index, batch in enumerate(plan.batches, start=1) for item in batch.items]

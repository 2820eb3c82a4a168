"""No reorg, however deep, pays a wallet twice (py-evm in process, the real schema).

A reorg of depth 1, PAYOUT_CONFIRMATIONS and twice that is made at every step of a batch, in every run of the
tracker: the last ``depth`` blocks are dropped and their transactions vanish (as on a node whose mempool lost
them). Afterwards an adversary re-broadcasts every transaction the tracker ever signed (they are public), in nonce
order, as often as they can be mined. Whatever happens, a wallet owed 22.5 FAR ends with exactly 22.5 FAR, and is
never above it at any moment. Two schedules: the treasury's allowance is there from the start, or it is revoked
during the first run (the first transaction reverts and must be sent again).
"""

from __future__ import annotations

from decimal import Decimal

import psycopg
import pytest

from services.payouts.audit import run_audit
from services.payouts.chain import new_local_chain
from services.payouts.executor import PayoutError, PayoutExecutor
from tests.payouts_support import onchain_balances, seed_session, wallet
from tests.test_payouts_executor import HookedExecutor, use_treasury

CONFIRMATIONS = 2
DEPTHS = (1, CONFIRMATIONS, 2 * CONFIRMATIONS)
STEPS = ("planned", "signed", "broadcast", "submitted", "mined", "confirmed")
OWED = Decimal("22.5")
MIN = Decimal("10")


def reorg(chain, depth: int) -> None:
    """Replace the last ``depth`` blocks by ``depth + 1`` empty ones: their transactions vanish."""
    w3 = chain.w3
    head = w3.eth.block_number
    w3.provider.ethereum_tester.backend.revert_to_snapshot(w3.eth.get_block(head - depth)["hash"])
    chain.advance(depth + 1)


def signed_transactions(postgres_url: str) -> set[tuple[int, bytes]]:
    """(nonce, raw transaction) of every transaction the tracker ever stored (first sends and re-sends)."""
    with psycopg.connect(postgres_url) as conn:
        rows = conn.execute("SELECT nonce, raw_tx FROM far_payment_batches WHERE raw_tx IS NOT NULL").fetchall()
        has_resends = conn.execute("SELECT to_regclass('far_payment_transactions') IS NOT NULL").fetchone()[0]
        if has_resends:
            rows += conn.execute("SELECT nonce, raw_tx FROM far_payment_transactions").fetchall()
    return {(int(nonce), bytes(raw)) for nonce, raw in rows}


def replay_everything(chain, postgres_url: str) -> int:
    """The adversary: re-broadcast each stored transaction whose nonce is next, until none can be mined."""
    w3 = chain.w3
    by_nonce: dict[int, list[bytes]] = {}
    for nonce, raw in signed_transactions(postgres_url):
        by_nonce.setdefault(nonce, []).append(raw)
    mined = 0
    while True:
        nonce = w3.eth.get_transaction_count(chain.address)
        for raw in by_nonce.get(nonce, []):
            try:
                w3.eth.send_raw_transaction(raw)
            except Exception:  # noqa: BLE001 - a revert is still mined; anything else: try the next copy
                pass
            if w3.eth.get_transaction_count(chain.address) > nonce:
                mined += 1
                break
        else:
            return mined


class ReorgingExecutor(HookedExecutor):
    def __init__(self, postgres_url, chain, *, hooks):
        super().__init__(postgres_url, chain, network="local", min_payout_far=MIN, confirmations=CONFIRMATIONS,
                         receipt_timeout_s=5, hooks=hooks)


async def pay_through_reorgs(postgres_url, chain, *, step: str, depth: int, revoke_first: bool) -> None:
    allow = use_treasury(chain)
    w = wallet(900)
    chain.advance(4 * CONFIRMATIONS)  # reorgs never reach the deployment
    before_payouts = chain.w3.eth.get_block("latest")["hash"]

    def check_never_above() -> None:
        assert onchain_balances(chain, [w])[w] <= OWED

    async def run(hooks) -> None:
        try:
            await ReorgingExecutor(postgres_url, chain, hooks=hooks).run_once()
        except PayoutError:
            pass  # an open batch the tracker cannot settle yet: the next run looks again
        check_never_above()

    def reorg_at_step(number) -> None:
        reorg(chain, depth)

    # 1. Three runs, each with a reorg at the step. "revoked-first": the first transaction is broadcast without an
    #    allowance, so it reverts (and the tracker must send the batch again).
    first = {step: reorg_at_step}
    if revoke_first:
        first["signed"] = (lambda number: (allow(False), reorg_at_step(number))) if step == "signed" else \
            (lambda number: allow(False))
    await run(first)
    for _ in range(2):
        allow(True)
        await run({step: reorg_at_step})
    # 2. The adversary: every stored transaction re-broadcast; then a reorg back to before the first payout (all
    #    payments vanish, the allowance is there) and everything re-broadcast again, in nonce order.
    replay_everything(chain, postgres_url)
    check_never_above()
    chain.w3.provider.ethereum_tester.backend.revert_to_snapshot(before_payouts)
    chain.advance(2)
    allow(True)
    replay_everything(chain, postgres_url)
    check_never_above()
    # 3. The tracker recovers what the reorg removed, once.
    for _ in range(2):
        await run({})
    replay_everything(chain, postgres_url)
    assert onchain_balances(chain, [w]) == {w: OWED}
    audit = await run_audit(postgres_url, chain)
    assert audit.ok, [c.problems for c in audit.checks]


@pytest.mark.parametrize("revoke_first", [False, True], ids=["allowed", "revoked-first"])
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("step", STEPS)
async def test_no_reorg_pays_twice(clean_db, postgres_url, step, depth, revoke_first):
    chain = new_local_chain()
    async with clean_db.acquire() as conn:
        await seed_session(conn, [(wallet(900), 1)], completion_tokens=2500)  # 22.5 FAR
    await pay_through_reorgs(postgres_url, chain, step=step, depth=depth, revoke_first=revoke_first)

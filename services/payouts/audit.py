"""``far-mesh audit``: cross-check the database's payout records against themselves and against the chain.

Checks (each reported as ok / problem with details):

1. **conservation** — every finalized session: ``cost_far = fee_far + Σ payment_far + Σ withheld_far`` of its
   contributions (``withheld_far``: the payment of a contribution disputed by a failed spot check, kept by the
   platform; docs/verification.md); a withheld contribution is disputed and carries no payment, and no disputed
   contribution sits in a payout batch unless it was batched before the dispute (reported as a note).
   A session served by the fallback API (``served_by = 'fallback'``, docs/fallback.md) has no contributions and
   ``fee_far = cost_far``: the platform kept the whole charge (it pays the upstream itself).
2. **attachment** — every contribution with a ``payment_batch_id`` is payable (finalized session, registered node,
   a wallet, positive payment), its batch is not ``failed`` (a failed batch must have released it) and, for a
   confirmed batch, the batch's items carry its wallet. Contributions of open batches are reported as in flight.
   (A contribution has one ``payment_batch_id`` column, so it belongs to at most one batch by construction.)
3. **items** — for every batch: per wallet, the item's ``amount_far`` equals the sum of the attached contributions,
   ``amount_base = amount_far × 10^18``, and ``total_far`` / ``recipient_count`` match the items.
4. **chain** — for every confirmed batch: the receipt of the transaction that paid it (``paid_tx_hash``: its first send or a re-send) succeeded in ``block_number``, the payout
   contract emitted ``BatchPaid(batch_number, …)`` in it, and the token ``Transfer`` events of that transaction are
   exactly the batch's items (same wallets, same base-unit amounts, nothing else); ``paid(batch_number)`` is true
   on the contract. For every failed batch the contract says ``paid(batch_number) == false`` (else a batch was paid
   whose contributions were released: a double payment). With ``scan_logs``, every ``BatchPaid`` event of the
   contract since ``from_block`` must belong to a confirmed batch of the database.
"""

from __future__ import annotations

from collections import Counter as Multiset
from decimal import Decimal

import asyncpg
from eth_utils import to_checksum_address

from services.common.audit import AuditReport, Check, block_chunks
from services.common.money import to_base_units
from services.common.states import BatchState
from services.deposits.audit import check_accounts, check_deposits_chain
from services.payouts.chain import Chain

TRANSFER_TOPIC = "0x" + "ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"


async def check_conservation(conn) -> Check:
    check = Check("conservation: cost = fee + Σ payments + Σ withheld (disputed) per finalized session", True)
    rows = await conn.fetch("""
        SELECT s.session_id, s.cost_far, s.fee_far, coalesce(sum(c.payment_far), 0) AS paid,
               coalesce(sum(c.withheld_far), 0) AS withheld
        FROM far_mesh_sessions s LEFT JOIN far_session_contributions c ON c.session_id = s.session_id
        WHERE s.finalized_at IS NOT NULL
        GROUP BY s.session_id
        HAVING s.cost_far IS DISTINCT FROM s.fee_far + coalesce(sum(c.payment_far), 0)
                                           + coalesce(sum(c.withheld_far), 0)""")
    check.checked = await conn.fetchval("SELECT count(*) FROM far_mesh_sessions WHERE finalized_at IS NOT NULL")
    for row in rows:
        check.fail(f"session {row['session_id']}: cost {row['cost_far']} != fee {row['fee_far']} "
                   f"+ payments {row['paid']} + withheld {row['withheld']}")
    fallback = await conn.fetch("""
        SELECT s.session_id, s.cost_far, s.fee_far, s.platform_fee_bps, count(c.peer_id) AS contributions
        FROM far_mesh_sessions s LEFT JOIN far_session_contributions c ON c.session_id = s.session_id
        WHERE s.served_by = 'fallback' AND s.finalized_at IS NOT NULL
        GROUP BY s.session_id""")
    for row in fallback:
        if row["contributions"] or row["fee_far"] != row["cost_far"] or row["platform_fee_bps"] != 10_000:
            check.fail(f"fallback session {row['session_id']}: {row['contributions']} contributions, cost "
                       f"{row['cost_far']}, fee {row['fee_far']} (bps {row['platform_fee_bps']}); a session "
                       "served by the fallback API pays no provider")
    if fallback:
        charged = sum((row["cost_far"] for row in fallback), Decimal(0))
        check.notes.append(f"{len(fallback)} sessions served by the fallback API: {charged} FAR charged, all fee")
    # Withholding moves a payment, it never makes or loses money: a withheld contribution is disputed and unpaid;
    # a disputed contribution of a finalized session keeps no payment unless it was batched before the dispute.
    bad_withheld = await conn.fetch("""
        SELECT c.session_id, c.peer_id, c.payment_far, c.withheld_far, c.disputed_at
        FROM far_session_contributions c JOIN far_mesh_sessions s USING (session_id)
        WHERE (c.withheld_far > 0 AND (c.disputed_at IS NULL OR c.payment_far <> 0))
           OR (c.disputed_at IS NOT NULL AND s.finalized_at IS NOT NULL AND c.payment_far <> 0
               AND c.payment_batch_id IS NULL)""")
    for row in bad_withheld:
        check.fail(f"contribution ({row['session_id']}, {row['peer_id']}): disputed {row['disputed_at']}, "
                   f"payment {row['payment_far']}, withheld {row['withheld_far']} (a disputed contribution must "
                   f"carry its payment as withheld, nothing else)")
    disputes = await conn.fetchrow("""
        SELECT count(*) AS n, coalesce(sum(withheld_far), 0) AS withheld,
               count(*) FILTER (WHERE payment_batch_id IS NOT NULL) AS batched_before,
               count(*) FILTER (WHERE withheld_reason = 'forfeited') AS forfeited,
               coalesce(sum(withheld_far) FILTER (WHERE withheld_reason = 'forfeited'), 0) AS forfeited_far
        FROM far_session_contributions WHERE disputed_at IS NOT NULL""")
    if disputes["n"]:
        check.notes.append(f"{disputes['n']} disputed contributions, {disputes['withheld']} FAR withheld (kept by "
                           f"the platform), of which {disputes['forfeited']} forfeited by a quarantined wallet "
                           f"({disputes['forfeited_far']} FAR); {disputes['batched_before']} were already in a "
                           f"payout batch when disputed")
    unfinalized_paid = await conn.fetchval("""
        SELECT count(*) FROM far_session_contributions c JOIN far_mesh_sessions s USING (session_id)
        WHERE s.finalized_at IS NULL AND c.payment_far <> 0""")
    if unfinalized_paid:
        check.notes.append(f"{unfinalized_paid} contributions of running sessions carry a payment (not final yet)")
    return check


async def check_attachment(conn) -> Check:
    check = Check("attachment: every paid contribution is in exactly one confirmed batch", True)
    check.checked = await conn.fetchval(
        "SELECT count(*) FROM far_session_contributions WHERE payment_batch_id IS NOT NULL")
    bad = await conn.fetch("""
        SELECT c.session_id, c.peer_id, b.batch_number, b.state, s.finalized_at, c.node_id, c.wallet_address,
               c.payment_far
        FROM far_session_contributions c
        JOIN far_payment_batches b ON b.batch_id = c.payment_batch_id
        JOIN far_mesh_sessions s ON s.session_id = c.session_id
        WHERE b.state = 'failed' OR s.finalized_at IS NULL OR c.node_id IS NULL OR c.wallet_address IS NULL
           OR c.payment_far <= 0""")
    for row in bad:
        why = ("its batch failed but it was not released" if row["state"] == BatchState.FAILED
               else "it is not payable (unfinalized session, unregistered node, no wallet or no payment)")
        check.fail(f"contribution ({row['session_id']}, {row['peer_id']}) in batch {row['batch_number']}: {why}")
    orphans = await conn.fetch("""
        SELECT c.session_id, c.peer_id, c.wallet_address, b.batch_number
        FROM far_session_contributions c
        JOIN far_payment_batches b ON b.batch_id = c.payment_batch_id
        LEFT JOIN far_payment_batch_items i ON i.batch_id = b.batch_id
                                           AND lower(i.wallet_address) = lower(c.wallet_address)
        WHERE i.batch_id IS NULL""")
    for row in orphans:
        check.fail(f"contribution ({row['session_id']}, {row['peer_id']}) is attached to batch "
                   f"{row['batch_number']} which has no item for {row['wallet_address']}")
    in_flight = await conn.fetchval("""
        SELECT count(*) FROM far_session_contributions c JOIN far_payment_batches b ON b.batch_id = c.payment_batch_id
        WHERE b.state IN ('planned', 'signed', 'submitted')""")
    if in_flight:
        check.notes.append(f"{in_flight} contributions are in open (unconfirmed) batches")
    return check


async def check_items(conn) -> Check:
    check = Check("items: batch items = attached contributions, totals add up", True)
    check.checked = await conn.fetchval("SELECT count(*) FROM far_payment_batches WHERE state <> 'failed'")
    mismatched = await conn.fetch("""
        WITH attached AS (
            SELECT payment_batch_id AS batch_id, lower(wallet_address) AS wallet, sum(payment_far) AS amount
            FROM far_session_contributions WHERE payment_batch_id IS NOT NULL
            GROUP BY 1, 2),
        items AS (
            SELECT i.batch_id, lower(i.wallet_address) AS wallet, i.amount_far AS amount, i.amount_base
            FROM far_payment_batch_items i JOIN far_payment_batches b USING (batch_id)
            WHERE b.state <> 'failed')
        SELECT coalesce(a.batch_id, i.batch_id) AS batch_id, coalesce(a.wallet, i.wallet) AS wallet,
               a.amount AS attached, i.amount AS item, i.amount_base
        FROM attached a FULL JOIN items i ON i.batch_id = a.batch_id AND i.wallet = a.wallet
        WHERE a.amount IS DISTINCT FROM i.amount
           OR i.amount_base IS DISTINCT FROM i.amount * 1000000000000000000""")
    for row in mismatched:
        check.fail(f"batch {row['batch_id']} wallet {row['wallet']}: item {row['item']} "
                   f"(base {row['amount_base']}) vs attached contributions {row['attached']}")
    totals = await conn.fetch("""
        SELECT b.batch_number, b.total_far, b.recipient_count, coalesce(sum(i.amount_far), 0) AS items_total,
               count(i.wallet_address) AS items_count
        FROM far_payment_batches b LEFT JOIN far_payment_batch_items i USING (batch_id)
        GROUP BY b.batch_id
        HAVING b.total_far <> coalesce(sum(i.amount_far), 0) OR b.recipient_count <> count(i.wallet_address)""")
    for row in totals:
        check.fail(f"batch {row['batch_number']}: total {row['total_far']} / {row['recipient_count']} recipients "
                   f"but items sum to {row['items_total']} / {row['items_count']}")
    return check


async def check_chain(conn, chain: Chain, *, scan_logs: bool = False, from_block: int | None = None) -> Check:
    check = Check("chain: confirmed batches = on-chain transfers; failed batches unpaid", True)
    w3 = chain.w3
    token = chain.token.address.lower()
    payout = chain.payout
    batch_paid_topic = "0x" + bytes(w3.keccak(text="BatchPaid(uint256,uint256,uint256)")).hex()
    batches = await conn.fetch("SELECT * FROM far_payment_batches WHERE state IN ('confirmed', 'failed') "
                               "ORDER BY batch_number")
    confirmed_numbers = set()
    for batch in batches:
        number = batch["batch_number"]
        if batch["contract_address"] and batch["contract_address"].lower() != payout.address.lower():
            check.notes.append(f"batch {number} paid through {batch['contract_address']}, not checked")
            continue
        check.checked += 1
        paid_on_chain = payout.functions.paid(number).call()
        if batch["state"] == BatchState.FAILED:
            if paid_on_chain:
                check.fail(f"batch {number} is failed (contributions released) but the contract says it is "
                           "paid: those contributions may be paid twice")
            continue
        confirmed_numbers.add(number)
        if not paid_on_chain:
            check.fail(f"batch {number} is confirmed but paid({number}) is false on chain")
            continue
        paid_by = batch["paid_tx_hash"] or batch["tx_hash"]  # the first send or a re-send (same batchId)
        try:
            receipt = w3.eth.get_transaction_receipt(paid_by)
        except Exception as error:  # noqa: BLE001
            check.fail(f"batch {number}: no receipt for {paid_by}: {error}")
            continue
        if receipt["status"] != 1 or receipt["blockNumber"] != batch["block_number"]:
            check.fail(f"batch {number}: receipt status {receipt['status']} in block {receipt['blockNumber']}, "
                       f"database says block {batch['block_number']}")
        transfers: Multiset = Multiset()
        closed = False
        for entry in receipt["logs"]:
            topics = ["0x" + bytes(t).hex() for t in entry["topics"]]
            if entry["address"].lower() == token and topics and topics[0] == TRANSFER_TOPIC:
                to = to_checksum_address("0x" + topics[2][-40:])
                transfers[(to, int.from_bytes(bytes(entry["data"]), "big"))] += 1
            elif entry["address"].lower() == payout.address.lower() and topics and topics[0] == batch_paid_topic:
                closed = int(topics[1], 16) == number
        if not closed:
            check.fail(f"batch {number}: no BatchPaid({number}) event in {paid_by}")
        items = await conn.fetch("SELECT wallet_address, amount_far, amount_base FROM far_payment_batch_items "
                                 "WHERE batch_id = $1", batch["batch_id"])
        expected = Multiset((to_checksum_address(row["wallet_address"]), to_base_units(Decimal(row["amount_far"])))
                            for row in items)
        if transfers != expected:
            missing = expected - transfers
            extra = transfers - expected
            check.fail(f"batch {number}: on-chain transfers differ from items (missing {dict(missing)}, "
                       f"unexpected {dict(extra)})")
    if scan_logs:
        start = from_block if from_block is not None else chain.deploy_block
        latest = w3.eth.block_number
        seen: Multiset = Multiset()
        for first, last in block_chunks(start, latest):
            logs = w3.eth.get_logs({"address": payout.address, "topics": [batch_paid_topic],
                                    "fromBlock": first, "toBlock": last})
            for entry in logs:
                seen[int("0x" + bytes(entry["topics"][1]).hex(), 16)] += 1
        for number, count in seen.items():
            if count > 1:
                check.fail(f"batchId {number} paid {count} times on chain")
            if number not in confirmed_numbers:
                check.fail(f"batchId {number} was paid on chain (BatchPaid event) but is not a confirmed "
                           "batch of this database")
        check.notes.append(f"scanned BatchPaid events in blocks {start}..{latest}: {sum(seen.values())} batches")
    return check


async def run_audit(postgres_url: str, chain: Chain | None, *, scan_logs: bool = True,
                    from_block: int | None = None, accounts: bool = False,
                    deposit_start_block: int = 0) -> AuditReport:
    """Payout checks 1-4; with ``accounts`` the books of the prepaid accounts (5) and, when the chain has a deposit
    contract, the deposits against the chain (6) — services/deposits/audit.py."""
    conn = await asyncpg.connect(postgres_url)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            checks = [await check_conservation(conn), await check_attachment(conn), await check_items(conn)]
            if chain is not None:
                checks.append(await check_chain(conn, chain, scan_logs=scan_logs, from_block=from_block))
            if accounts:
                checks.append(await check_accounts(conn))
                if chain is not None and getattr(chain, "deposit", None) is not None:
                    checks.append(await check_deposits_chain(conn, chain, start_block=deposit_start_block))
    finally:
        await conn.close()
    return AuditReport(checks)

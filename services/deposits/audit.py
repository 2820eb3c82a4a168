"""``far-mesh audit``, money in: the accounts' books and the deposits against the chain (docs/accounts.md).

5. **accounts** — per account, with ``credits`` = Σ ``far_account_ledger.amount_far`` (deposits, grants, opening),
   ``charged`` = Σ ``cost_far`` of its finalized sessions, ``reserved`` = ``far_accounts.reserved_far`` and
   ``available`` = ``balance_far − reserved_far``:

       credits = available + reserved + charged            (i.e. credits = balance_far + charged)

   and ``reserved_far`` = Σ ``reserved_far`` of its running sessions, and no finalized session was charged more than
   it reserved. Totals: Σ deposits + Σ grants + Σ opening = Σ available + Σ reserved + Σ charged, and
   Σ charged = Σ contributions + Σ platform fee + Σ withheld + Σ disputed, where the platform fee of a session is
   ``cost × bps / 10000`` rounded down to 1e-18 FAR and *withheld* is the rest of ``fee_far`` (shares of
   never-registered peers and rounding dust, which finalize_session() keeps out of the providers' pool) and
   Σ disputed is the payments withheld from contributions that failed a spot check (``withheld_far``, also kept by
   the platform; docs/verification.md).
   Every credited deposit has exactly one ledger entry of its amount for its account.
6. **deposits vs chain** — every ``far_deposits`` row: its transaction's receipt succeeded in the recorded block (same
   hash: not reorganised away), and the log at ``log_index`` is the deposit contract's ``Deposit`` with the same
   accountRef, sender and amount. Every ``Deposit`` event of the contract from ``DEPOSIT_START_BLOCK`` up to the
   watcher's cursor is in ``far_deposits`` (none missed); events after the cursor are reported as not final yet.
"""

from __future__ import annotations

from collections import Counter as Multiset
from decimal import Decimal

from services.deposits.watcher import DEPOSIT_TOPIC, _hex, fetch_deposit_logs
from services.common.audit import Check, block_chunks


async def check_accounts(conn) -> Check:
    check = Check("accounts: credits = available + reserved + charged, per account and in total", True)
    await _check_balances(conn, check)
    await _check_charge_split(conn, check)
    await _check_ledger(conn, check)
    return check


async def _check_balances(conn, check: Check) -> None:
    """Per account: credits = available + reserved + charged; reserved = Σ reserved of its running sessions."""
    rows = await conn.fetch("""
        WITH credits AS (SELECT account_id, sum(amount_far) AS credits,
                                sum(amount_far) FILTER (WHERE kind = 'deposit') AS deposits,
                                sum(amount_far) FILTER (WHERE kind = 'grant') AS grants,
                                sum(amount_far) FILTER (WHERE kind = 'opening') AS opening,
                                sum(amount_far) FILTER (WHERE kind = 'refund') AS refunds
                           FROM far_account_ledger GROUP BY account_id),
             charged AS (SELECT account_id, sum(cost_far) FILTER (WHERE finalized_at IS NOT NULL) AS charged,
                                sum(reserved_far) FILTER (WHERE finalized_at IS NULL) AS held,
                                count(*) FILTER (WHERE finalized_at IS NOT NULL AND cost_far > reserved_far) AS over
                           FROM far_mesh_sessions WHERE account_id IS NOT NULL GROUP BY account_id)
        SELECT a.account_id, a.balance_far, a.reserved_far,
               coalesce(c.credits, 0) AS credits, coalesce(c.deposits, 0) AS deposits,
               coalesce(c.grants, 0) AS grants, coalesce(c.opening, 0) AS opening, coalesce(c.refunds, 0) AS refunds,
               coalesce(s.charged, 0) AS charged, coalesce(s.held, 0) AS held, coalesce(s.over, 0) AS over
          FROM far_accounts a
          LEFT JOIN credits c USING (account_id) LEFT JOIN charged s USING (account_id)""")
    check.checked = len(rows)
    totals = dict.fromkeys(("deposits", "grants", "opening", "refunds", "available", "reserved", "charged"),
                           Decimal(0))
    for row in rows:
        available = row["balance_far"] - row["reserved_far"]
        for key in ("deposits", "grants", "opening", "refunds", "charged"):
            totals[key] += row[key]
        totals["available"] += available
        totals["reserved"] += row["reserved_far"]
        if row["credits"] != available + row["reserved_far"] + row["charged"]:
            check.fail(f"account {row['account_id']}: credits {row['credits']} != available {available} + "
                       f"reserved {row['reserved_far']} + charged {row['charged']}")
        if row["reserved_far"] != row["held"]:
            check.fail(f"account {row['account_id']}: reserved_far {row['reserved_far']} != Σ reserved of its "
                       f"running sessions {row['held']}")
        if row["over"]:
            check.fail(f"account {row['account_id']}: {row['over']} sessions cost more than they reserved")
    credits = totals["deposits"] + totals["grants"] + totals["opening"] + totals["refunds"]
    check.notes.append(f"Σ deposits {totals['deposits']} + Σ grants {totals['grants']} + Σ opening {totals['opening']}"
                       f" + Σ refunds {totals['refunds']} = {credits}; Σ available {totals['available']} + Σ reserved {totals['reserved']} + "
                       f"Σ charged {totals['charged']} = "
                       f"{totals['available'] + totals['reserved'] + totals['charged']}")


async def _check_charge_split(conn, check: Check) -> None:
    """Σ charged = Σ contributions + Σ platform fee + Σ withheld + Σ disputed, over the accounts' sessions."""
    split = await conn.fetchrow("""
        WITH s AS (
            SELECT session_id, cost_far, fee_far,
                   div(cost_far * 1000000000000000000 * platform_fee_bps, 10000)
                       * 0.000000000000000001 AS platform_fee
              FROM far_mesh_sessions WHERE account_id IS NOT NULL AND finalized_at IS NOT NULL)
        SELECT coalesce(sum(s.cost_far), 0) AS charged, coalesce(sum(s.platform_fee), 0) AS platform_fee,
               coalesce(sum(s.fee_far - s.platform_fee), 0) AS withheld,
               coalesce((SELECT sum(c.payment_far) FROM far_session_contributions c JOIN s USING (session_id)), 0)
                   AS contributions,
               coalesce((SELECT sum(c.withheld_far) FROM far_session_contributions c JOIN s USING (session_id)), 0)
                   AS disputed,
               count(*) FILTER (WHERE s.fee_far < s.platform_fee) AS under
          FROM s""")
    if (split["charged"] != split["contributions"] + split["platform_fee"] + split["withheld"] + split["disputed"]
            or split["under"]):
        check.fail(f"Σ charged {split['charged']} != Σ contributions {split['contributions']} + Σ platform fee "
                   f"{split['platform_fee']} + Σ withheld {split['withheld']} + Σ disputed {split['disputed']} "
                   f"({split['under']} sessions with a fee below the platform fee)")
    check.notes.append(f"Σ charged {split['charged']} = Σ contributions {split['contributions']} + Σ platform fee "
                       f"{split['platform_fee']} + Σ withheld {split['withheld']} + Σ disputed {split['disputed']}")


async def _check_ledger(conn, check: Check) -> None:
    """One ledger entry per credited deposit, none for an unmatched one; every refund is a proven-wrong charge."""
    bad_ledger = await conn.fetch("""
        SELECT d.deposit_id, d.tx_hash, d.log_index, d.amount_far, d.account_id, count(l.entry_id) AS entries,
               min(l.amount_far) AS ledger_amount, bool_and(l.account_id = d.account_id) AS same_account
          FROM far_deposits d LEFT JOIN far_account_ledger l ON l.deposit_id = d.deposit_id
         GROUP BY d.deposit_id
        HAVING (d.state = 'credited' AND (count(l.entry_id) <> 1 OR min(l.amount_far) <> d.amount_far
                                          OR NOT bool_and(l.account_id = d.account_id)))
            OR (d.state = 'unmatched' AND count(l.entry_id) <> 0)""")
    for row in bad_ledger:
        check.fail(f"deposit {row['tx_hash']}:{row['log_index']} ({row['amount_far']} FAR): {row['entries']} "
                   f"ledger entries of {row['ledger_amount']} FAR (same account: {row['same_account']})")
    # A refund gives back exactly the charge of one finalized session of the same account that a spot check proved
    # wrong (docs/verification.md): the platform's cost, never money out of nowhere.
    bad_refunds = await conn.fetch("""
        SELECT l.entry_id, l.session_id, l.amount_far, s.cost_far, s.account_id = l.account_id AS same_account
          FROM far_account_ledger l LEFT JOIN far_mesh_sessions s ON s.session_id = l.session_id
         WHERE l.kind = 'refund'
           AND (s.session_id IS NULL OR s.finalized_at IS NULL OR s.cost_far <> l.amount_far
                OR s.account_id IS DISTINCT FROM l.account_id
                OR NOT EXISTS (SELECT 1 FROM far_spot_checks k WHERE k.session_id = l.session_id
                                                                 AND k.outcome = 'failed'))""")
    for row in bad_refunds:
        check.fail(f"refund {row['entry_id']} of session {row['session_id']}: {row['amount_far']} FAR for a "
                   f"charge of {row['cost_far']} (same account: {row['same_account']}), or no failed check proves "
                   "it wrong")
    unmatched = await conn.fetchrow("SELECT count(*) AS n, coalesce(sum(amount_far), 0) AS far FROM far_deposits "
                                    "WHERE state = 'unmatched'")
    if unmatched["n"]:
        check.notes.append(f"{unmatched['n']} unmatched deposits ({unmatched['far']} FAR in the treasury, credited to "
                           "nobody): settle them by hand")


async def check_deposits_chain(conn, chain, *, start_block: int = 0) -> Check:
    check = Check("deposits: every credited deposit is on chain, every final Deposit event is recorded", True)
    contract = chain.deposit.address.lower()
    w3 = chain.w3
    chain_id = chain.chain_id
    rows = await conn.fetch("SELECT * FROM far_deposits WHERE chain_id = $1 AND contract_address = $2 "
                            "ORDER BY block_number, log_index", chain_id, contract)
    check.checked = len(rows)
    for row in rows:
        where = f"deposit {row['tx_hash']}:{row['log_index']} ({row['amount_far']} FAR, {row['state']})"
        try:
            receipt = w3.eth.get_transaction_receipt(row["tx_hash"])
        except Exception as error:  # noqa: BLE001 - TransactionNotFound and node errors alike
            check.fail(f"{where}: no receipt on chain ({type(error).__name__}); reorganised away?")
            continue
        if (receipt["status"] != 1 or receipt["blockNumber"] != row["block_number"]
                or _hex(receipt["blockHash"]) != row["block_hash"]):
            check.fail(f"{where}: receipt status {receipt['status']} in block {receipt['blockNumber']} "
                       f"{_hex(receipt['blockHash'])}, recorded block {row['block_number']} {row['block_hash']}")
            continue
        match = [entry for entry in receipt["logs"] if int(entry["logIndex"]) == row["log_index"]]
        if not match:
            check.fail(f"{where}: no log {row['log_index']} in its transaction")
            continue
        entry = match[0]
        topics = [_hex(t) for t in entry["topics"]]
        amount = int.from_bytes(bytes(entry["data"]), "big")
        if (entry["address"].lower() != contract or topics[:1] != [DEPOSIT_TOPIC] or topics[1] != row["account_ref"]
                or ("0x" + topics[2][-40:]) != row["from_address"].lower() or Decimal(amount) != row["amount_base"]):
            check.fail(f"{where}: the log on chain differs (address {entry['address']}, topics {topics}, "
                       f"amount {amount})")
    cursor = await conn.fetchrow("SELECT last_block FROM far_deposit_cursors WHERE chain_id = $1 AND "
                                 "contract_address = $2", chain_id, contract)
    last = cursor["last_block"] if cursor else start_block - 1
    latest = w3.eth.block_number
    recorded = Multiset((row["tx_hash"], row["log_index"]) for row in rows)
    pending = 0
    for first, last in block_chunks(start_block, latest):
        for event in fetch_deposit_logs(chain, contract, first, last):
            key = (event.tx_hash, event.log_index)
            if recorded[key]:
                continue
            if event.block_number <= last:
                check.fail(f"Deposit {event.tx_hash}:{event.log_index} of {event.amount_far} FAR in block "
                           f"{event.block_number} is final and was never recorded (watcher cursor {last})")
            else:
                pending += 1
    check.notes.append(f"watcher cursor at block {last} of {latest}; {pending} Deposit events after it (not final "
                       "or not processed yet)")
    return check

"""Deposits on a real EVM (py-evm in process) and the real schema: FarDeposit, the watcher, the ledger, the audit.

Covers: a deposit is credited once it is PAYOUT_CONFIRMATIONS deep, exactly once (re-runs, two watchers); a crash
(injected) at every checkpoint of the watcher then a re-run credits every deposit exactly once; a deposit that a
reorg (eth-tester snapshot/revert) removes before it is final is never credited, and one re-mined elsewhere is
credited once; reorgs of 1, PAYOUT_CONFIRMATIONS and twice that credit exactly once; a reorg deeper than the
confirmations that removes a credited deposit stops the watcher and the audit names the vanished deposit; an
accountRef naming no account is recorded unmatched; the ledger is append-only; the audit's books hold.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

import asyncpg
import pytest
from eth_account import Account

from services.coordinator.accounts import AccountStore
from services.deposits.watcher import (
    CHECKPOINTS,
    DepositReorgError,
    DepositWatcher,
    InjectedCrash,
    account_from_ref,
    account_ref,
    deposit,
    send_from,
)
from services.payouts.audit import run_audit
from services.payouts.chain import new_local_chain

FAR = 10**18
CONFIRMATIONS = 3


@pytest.fixture
def chain():
    return new_local_chain()


@pytest.fixture
def db_url(make_database):
    """A fresh database per test: the ledger and deposits are append-only (no TRUNCATE), and the audit's books are
    global."""
    return make_database()


@pytest.fixture
async def accounts(db_url):
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    yield AccountStore(pool)
    await pool.close()


def make_watcher(db_url, chain, **overrides) -> DepositWatcher:
    kwargs = dict(confirmations=CONFIRMATIONS)
    kwargs.update(overrides)
    return DepositWatcher(db_url, chain, **kwargs)


def funded_user(chain, far_base: int):
    user = Account.create()
    chain.w3.eth.send_transaction({"from": chain.w3.eth.accounts[0], "to": user.address, "value": 10**20})
    chain.send(chain.token.functions.transfer(user.address, far_base).build_transaction({"from": chain.address}))
    return user


async def balance(accounts: AccountStore, account_id: str) -> Decimal:
    return (await accounts.account(account_id))["balance_far"]


async def audit_ok(db_url, chain):
    report = await run_audit(db_url, chain, accounts=True)
    assert report.ok, [(c.name, c.problems) for c in report.checks if not c.ok]
    return report


def test_account_ref_round_trip():
    account_id = str(uuid.uuid4())
    ref = account_ref(account_id)
    assert len(ref) == 66 and str(account_from_ref(ref)) == account_id
    assert account_from_ref("0x" + "11" * 32) is None


async def test_deposit_credited_once_when_final(db_url, chain, accounts):
    account_id = await accounts.create_account("alice")
    user = funded_user(chain, 100 * FAR)
    treasury_before = chain.far_balance(chain.address)
    receipt = deposit(chain, user, account_id, 25 * FAR + 7)
    assert chain.far_balance(chain.address) == treasury_before + 25 * FAR + 7  # straight to the treasury
    assert chain.far_balance(chain.deposit.address) == 0
    watcher = make_watcher(db_url, chain)

    chain.advance(CONFIRMATIONS - 1)  # not deep enough yet
    report = await watcher.run_once()
    assert report.credited == [] and await balance(accounts, account_id) == 0

    chain.advance(1)
    report = await watcher.run_once()
    expected = Decimal(25 * FAR + 7).scaleb(-18)
    assert [(c.account_id, c.amount_far) for c in report.credited] == [(account_id, expected)]
    assert report.credited[0].tx_hash == "0x" + bytes(receipt["transactionHash"]).hex()
    assert await balance(accounts, account_id) == expected

    # Re-runs, a new watcher (restart), and a watcher re-scanning from block 0 with a fresh cursor key never re-credit.
    chain.advance(5)
    assert (await watcher.run_once()).credited == []
    assert (await make_watcher(db_url, chain).run_once()).credited == []
    assert await balance(accounts, account_id) == expected
    async with accounts.pool.acquire() as conn:
        ledger = await conn.fetch("SELECT kind, amount_far, balance_after_far FROM far_account_ledger "
                                  "WHERE account_id = $1", uuid.UUID(account_id))
        assert [tuple(r) for r in ledger] == [("deposit", expected, expected)]
        await conn.execute("DELETE FROM far_deposit_cursors")  # forget the cursor: a full re-scan
    assert (await make_watcher(db_url, chain).run_once()).already_known == 1
    assert await balance(accounts, account_id) == expected
    await audit_ok(db_url, chain)


async def test_ledger_is_append_only_and_grants_are_recorded(db_url, chain, accounts):
    account_id = await accounts.create_account("bob", Decimal("5"))
    assert await accounts.credit(account_id, Decimal("1.5")) == Decimal("6.5")
    with pytest.raises(LookupError):
        await accounts.credit(str(uuid.uuid4()), Decimal(1))
    async with accounts.pool.acquire() as conn:
        rows = await conn.fetch("SELECT kind, amount_far FROM far_account_ledger ORDER BY entry_id")
        assert [tuple(r) for r in rows] == [("grant", Decimal(5)), ("grant", Decimal("1.5"))]
        for statement in ("UPDATE far_account_ledger SET amount_far = 100", "DELETE FROM far_account_ledger",
                          "TRUNCATE far_account_ledger", "TRUNCATE far_deposits CASCADE"):
            with pytest.raises(asyncpg.CheckViolationError, match="append-only"):
                await conn.execute(statement)
    await audit_ok(db_url, chain)
    # A balance changed behind the ledger's back is what the audit is for.
    async with accounts.pool.acquire() as conn:
        await conn.execute("UPDATE far_accounts SET balance_far = balance_far + 1 WHERE account_id = $1",
                           uuid.UUID(account_id))
    report = await run_audit(db_url, chain, accounts=True)
    assert not report.ok and "credits 6.5" in " ".join(report.checks[-2].problems)


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
@pytest.mark.parametrize("nth", [1, 2])
async def test_crash_at_every_checkpoint_then_rerun_credits_once(db_url, chain, accounts, checkpoint, nth):
    ids = [await accounts.create_account(f"acct-{i}") for i in range(3)]
    user = funded_user(chain, 1000 * FAR)
    amounts = {}
    for round_ in range(2):  # deposits spread over several blocks (several chunks of 2 blocks)
        for i, account_id in enumerate(ids):
            amount = (i + 1) * FAR + round_
            deposit(chain, user, account_id, amount)
            amounts[account_id] = amounts.get(account_id, 0) + amount
        chain.advance(1)
    chain.advance(CONFIRMATIONS)
    with pytest.raises(InjectedCrash):
        await make_watcher(db_url, chain, chunk=2, crash_at=f"{checkpoint}:{nth}").run_once()
    # The lock of the dead run is gone with its connection; a restarted watcher finishes the work.
    report = await make_watcher(db_url, chain, chunk=2).run_once()
    assert report.skipped is None
    for account_id in ids:
        assert await balance(accounts, account_id) == Decimal(amounts[account_id]).scaleb(-18)
    assert (await make_watcher(db_url, chain).run_once()).credited == []
    async with accounts.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM far_deposits") == 6
        assert await conn.fetchval("SELECT count(*) FROM far_account_ledger") == 6
    await audit_ok(db_url, chain)


async def test_reorg_before_final_never_credits_and_remined_deposit_credits_once(db_url, chain, accounts):
    account_id = await accounts.create_account("carol")
    user = funded_user(chain, 100 * FAR)
    send_from(chain, user, chain.token.functions.approve(chain.deposit.address, 100 * FAR).build_transaction(
        {"from": user.address}))
    tester = chain.w3.provider.ethereum_tester
    watcher = make_watcher(db_url, chain)
    await watcher.run_once()
    snapshot = tester.take_snapshot()

    # Mined, seen 1 block deep, then reorganised away: never credited.
    tx = chain.deposit.functions.deposit(bytes.fromhex(account_ref(account_id)[2:]), 10 * FAR).build_transaction(
        {"from": user.address, "nonce": chain.w3.eth.get_transaction_count(user.address), "gas": 200_000,
         "gasPrice": chain.gas_price(), "chainId": chain.chain_id})
    raw = user.sign_transaction(tx).raw_transaction
    chain.w3.eth.send_raw_transaction(raw)
    chain.advance(1)
    assert (await watcher.run_once()).credited == []
    tester.revert_to_snapshot(snapshot)
    chain.advance(CONFIRMATIONS + 3)  # a longer chain without the deposit
    assert (await watcher.run_once()).credited == []
    assert await balance(accounts, account_id) == 0
    async with accounts.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM far_deposits") == 0
    await audit_ok(db_url, chain)

    # The same signed transaction re-mined in a later block: credited once, from its final position.
    chain.w3.eth.send_raw_transaction(raw)
    receipt = chain.w3.eth.wait_for_transaction_receipt(raw and chain.w3.keccak(raw))
    chain.advance(CONFIRMATIONS)
    report = await watcher.run_once()
    assert [c.amount_far for c in report.credited] == [Decimal(10)]
    async with accounts.pool.acquire() as conn:
        assert await conn.fetchval("SELECT block_number FROM far_deposits") == receipt["blockNumber"]
    assert await balance(accounts, account_id) == 10
    await audit_ok(db_url, chain)


async def test_reorg_deeper_than_confirmations_stops_the_watcher(db_url, chain, accounts):
    account_id = await accounts.create_account("dave")
    user = funded_user(chain, 100 * FAR)
    snapshot = chain.w3.provider.ethereum_tester.take_snapshot()
    deposit(chain, user, account_id, 3 * FAR)
    chain.advance(CONFIRMATIONS)
    watcher = make_watcher(db_url, chain)
    assert len((await watcher.run_once()).credited) == 1
    chain.w3.provider.ethereum_tester.revert_to_snapshot(snapshot)
    chain.advance(CONFIRMATIONS + 6)
    with pytest.raises(DepositReorgError, match="deeper than PAYOUT_CONFIRMATIONS"):
        await watcher.run_once()
    report = await run_audit(db_url, chain, accounts=True)
    problems = [p for c in report.checks for p in c.problems]
    assert not report.ok and any("no receipt on chain" in p or "recorded block" in p for p in problems), problems


async def test_unknown_account_ref_is_unmatched_not_credited(db_url, chain, accounts):
    account_id = await accounts.create_account("erin")
    user = funded_user(chain, 100 * FAR)
    send_from(chain, user, chain.token.functions.approve(chain.deposit.address, 10 * FAR).build_transaction(
        {"from": user.address}))
    for ref in (bytes.fromhex("11" * 32), bytes.fromhex(account_ref(uuid.uuid4())[2:])):
        send_from(chain, user, chain.deposit.functions.deposit(ref, FAR).build_transaction({"from": user.address}))
    deposit(chain, user, account_id, 2 * FAR)
    chain.advance(CONFIRMATIONS)
    report = await make_watcher(db_url, chain).run_once()
    assert len(report.unmatched) == 2 and [c.amount_far for c in report.credited] == [Decimal(2)]
    report = await audit_ok(db_url, chain)
    assert any("2 unmatched deposits" in note for c in report.checks for note in c.notes)


async def test_deposit_contract_rejects_zero_ref_and_amount(chain):
    from eth_tester.exceptions import TransactionFailed
    from web3.exceptions import ContractLogicError

    user = funded_user(chain, 10 * FAR)
    for ref, amount in ((bytes(32), FAR), (bytes.fromhex(account_ref(uuid.uuid4())[2:]), 0)):
        with pytest.raises((ContractLogicError, TransactionFailed, RuntimeError)):
            send_from(chain, user, chain.deposit.functions.deposit(ref, amount).build_transaction(
                {"from": user.address, "gas": 200_000}))
    with pytest.raises((ContractLogicError, TransactionFailed, RuntimeError)):  # no allowance
        send_from(chain, user, chain.deposit.functions.deposit(bytes.fromhex("22" * 32), FAR).build_transaction(
            {"from": user.address, "gas": 200_000}))


async def test_two_watchers_at_once_credit_once(db_url, chain, accounts):
    import asyncio

    account_id = await accounts.create_account("frank")
    user = funded_user(chain, 100 * FAR)
    for _ in range(4):
        deposit(chain, user, account_id, FAR)
    chain.advance(CONFIRMATIONS)
    reports = await asyncio.gather(*(make_watcher(db_url, chain, chunk=1).run_once() for _ in range(3)))
    assert sum(len(r.credited) for r in reports) == 4
    assert await balance(accounts, account_id) == 4
    await audit_ok(db_url, chain)


async def test_payouts_serve_runs_the_watcher_and_cli_prints_the_ref(db_url, chain, accounts):
    import asyncio

    from typer.testing import CliRunner

    from services.common.config import Settings
    from services.deposits.cli import app as deposits_app
    from services.payouts.server import PayoutService

    account_id = await accounts.create_account("gina")
    user = funded_user(chain, 10 * FAR)
    deposit(chain, user, account_id, FAR)
    chain.advance(CONFIRMATIONS)
    service = PayoutService(Settings(POSTGRES_URL=db_url, PAYOUT_CONFIRMATIONS=CONFIRMATIONS), "local")
    service._chain = chain
    assert service.deposits_enabled()
    await asyncio.to_thread(service.run_deposits)  # what the scheduler's "deposits" job does
    assert service.deposits_error is None and await balance(accounts, account_id) == 1
    result = CliRunner().invoke(deposits_app, ["ref", account_id])
    assert result.exit_code == 0 and result.output.strip() == account_ref(account_id)


@pytest.mark.parametrize("depth", [1, CONFIRMATIONS, 2 * CONFIRMATIONS])
@pytest.mark.parametrize("moment", ["mined", "final", "credited"])
async def test_deposit_credited_exactly_once_across_reorgs(db_url, chain, accounts, depth, moment):
    """A reorg of depth 1, PAYOUT_CONFIRMATIONS or twice that, right after the deposit is mined, once it is final
    but before the watcher ran, or after it was credited; the same signed deposit is then re-mined (anyone can
    re-broadcast it) and the watcher runs again: the account is credited exactly once. A reorg deeper than the
    confirmations that reaches no recorded deposit rewinds the watcher; one that reaches a credited deposit stops it
    for an operator instead of crediting again."""
    account_id = await accounts.create_account("frank")
    user = funded_user(chain, 100 * FAR)
    send_from(chain, user, chain.token.functions.approve(chain.deposit.address, 100 * FAR).build_transaction(
        {"from": user.address}))
    chain.advance(3 * CONFIRMATIONS)
    watcher = make_watcher(db_url, chain)
    await watcher.run_once()
    tx = chain.deposit.functions.deposit(bytes.fromhex(account_ref(account_id)[2:]), 10 * FAR).build_transaction(
        {"from": user.address, "nonce": chain.w3.eth.get_transaction_count(user.address), "gas": 200_000,
         "gasPrice": chain.gas_price(), "chainId": chain.chain_id})
    raw = user.sign_transaction(tx).raw_transaction
    chain.w3.eth.send_raw_transaction(raw)
    if moment in ("final", "credited"):
        chain.advance(CONFIRMATIONS)
    if moment == "credited":
        assert [c.amount_far for c in (await watcher.run_once()).credited] == [Decimal(10)]
    head = chain.w3.eth.block_number
    chain.w3.provider.ethereum_tester.backend.revert_to_snapshot(chain.w3.eth.get_block(head - depth)["hash"])
    chain.advance(depth + 1)
    if chain.w3.eth.get_transaction_count(user.address) == tx["nonce"]:
        chain.w3.eth.send_raw_transaction(raw)  # re-mined in the new branch
    chain.advance(CONFIRMATIONS)
    for _ in range(2):
        try:
            await watcher.run_once()
        except DepositReorgError:
            assert moment == "credited" and depth > CONFIRMATIONS
    assert await balance(accounts, account_id) == 10
    async with accounts.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM far_account_ledger WHERE kind = 'deposit'") == 1
        assert await conn.fetchval("SELECT count(*) FROM far_deposits") == 1

"""Trust among strangers (docs/verification.md "Threat model"), on the real schema with a scripted swarm:

* who may verify: registered servers with a clean record, on wallets distinct from the checked server's and from
  each other; a disagreement is settled by the trusted verifier, which also checks spans nobody else holds;
* two colluders that return one agreed wrong answer whenever they verify cannot frame an honest server: they are
  the suspects, and quarantined;
* an inconclusive check holds the contribution unpaid until it is settled;
* a quarantine follows the wallet: a fresh key of a quarantined wallet is quarantined, routed around, shown by
  discovery; lifting it is the operator's recorded decision;
* a proven cheater forfeits every unpaid contribution of its wallet: an intermittent cheater (10 % of its steps)
  is quarantined within the bound of the docs and paid 0;
* the user of a session proven wrong is refunded (during or after the session), once, and the books balance.
"""

from __future__ import annotations

import random
import uuid
from decimal import Decimal

import asyncpg
import pytest
import torch

from services.coordinator.checks import CheckConsequences, CheckStore, sync_quarantine
from services.coordinator.metering import PeerWork
from services.coordinator.store import Pricing, SessionStore
from services.coordinator.verification import (FAILED, INCONCLUSIVE, PASSED, TRUSTED_VERIFIER, VERIFIER_FAILED,
                                               CheckJob, SamplingPolicy, SpotChecker)
from services.payouts.audit import check_conservation
from services.payouts.planner import load_dues
from tests.payouts_support import ensure_node, now, seed_session, wallet

HIDDEN = 32


def truth(hidden: torch.Tensor) -> torch.Tensor:
    """What the blocks compute (the scripted model)."""
    return torch.tanh(hidden * 1.7) + 0.1


def honest(hidden: torch.Tensor) -> torch.Tensor:
    return truth(hidden) + 1e-7 * torch.randn_like(hidden)


def agreed_lie(hidden: torch.Tensor) -> torch.Tensor:
    """The colluders' one agreed wrong answer: both return exactly this."""
    return truth(hidden) * 1.3


class ScriptedSwarm:
    """SwarmForward's interface over scripted servers: peer -> function of the span's inputs."""

    def __init__(self, servers: dict):
        self.servers = servers
        self.calls: list[str] = []

    def candidates(self, start, end, exclude):
        return sorted((peer, "float32") for peer in self.servers if peer not in exclude)

    def dtype_of(self, peer_id, block):
        return "float32"

    def forward(self, peer_id, start, end, hidden, timeout):
        self.calls.append(peer_id)
        return self.servers[peer_id](hidden)


class ScriptedTrusted:
    name, dtype = TRUSTED_VERIFIER, "float32"

    def __init__(self):
        self.calls = 0

    def can_hold(self, start, end):
        return True

    def forward(self, start, end, hidden):
        self.calls += 1
        return truth(hidden)


def job_for(peer: str, *, session_id=None, served=honest, length: int = 6) -> CheckJob:
    history = torch.randn(1, length, HIDDEN)
    return CheckJob("m", session_id, peer, 0, 4, history, served(history)[:, -1:], "float32", avoid=set())


def checker(servers: dict, registry: dict, *, trusted=True, clean_record: int = 0, seed: int = 0) -> SpotChecker:
    policy = SamplingPolicy(rate=1.0, new_node_rate=1.0, clean_record=clean_record)
    spot = SpotChecker("m", ScriptedSwarm(servers), policy, lambda result: None, seed=seed,
                       trusted=ScriptedTrusted() if trusted else None)
    spot.registry = dict(registry)
    return spot


# ------------------------------------------------------------------------------------------------ who verifies


def test_only_registered_clean_servers_on_other_wallets_verify():
    servers = {p: honest for p in ("checked", "same-wallet", "anonymous", "new", "quarantined", "good-1", "good-2")}
    registry = {"checked": "w1", "same-wallet": "w1", "new": "w3", "quarantined": "w4", "good-1": "w5",
                "good-2": "w5"}
    spot = checker(servers, registry, clean_record=2)
    for peer in ("same-wallet", "quarantined", "good-1", "good-2"):
        spot.policy.passed[peer] = 2
    spot.quarantined.add("quarantined")
    eligible = spot.eligible(spot.forward.candidates(0, 4, {"checked"}), "checked")
    assert [peer for peer, _dtype, _wallet in eligible] == ["good-1", "good-2"]
    # good-1 and good-2 share a wallet: when they disagree with the checked server, the other one is no referee
    liar = checker({"checked": honest, "good-1": agreed_lie, "good-2": agreed_lie},
                   {"checked": "w1", "good-1": "w5", "good-2": "w5"}, trusted=False)
    for _ in range(10):
        (result,) = liar.check(job_for("checked"))
        assert result.verdict.outcome == INCONCLUSIVE and result.referee is None


def test_the_trusted_verifier_checks_spans_nobody_else_holds():
    spot = checker({"only": honest, "cheater": agreed_lie}, {"only": "w1", "cheater": "w2"}, clean_record=5)
    (result,) = spot.check(job_for("only"))  # "cheater" is not clean: the trusted verifier checks
    assert (result.verdict.outcome, result.verifier) == (PASSED, TRUSTED_VERIFIER)
    (result,) = spot.check(job_for("cheater", served=agreed_lie))
    assert (result.verdict.outcome, result.suspect_peer, result.verifier) == (FAILED, "cheater", TRUSTED_VERIFIER)
    assert checker({"only": honest}, {"only": "w1"}, trusted=False).check(job_for("only")) == []  # nobody: unchecked


def test_two_colluders_cannot_frame_an_honest_server():
    """Both colluders announce nothing special, verify with one agreed wrong answer: whichever is the verifier and
    whichever the referee, the honest server is never the suspect; the colluders are."""
    servers = {"honest": honest, "colluder-1": agreed_lie, "colluder-2": agreed_lie}
    registry = {"honest": "w1", "colluder-1": "w2", "colluder-2": "w3"}
    spot = checker(servers, registry)
    suspects = []
    for _ in range(40):
        for result in spot.check(job_for("honest")):
            assert result.suspect_peer != "honest"
            assert result.verdict.outcome in (PASSED, VERIFIER_FAILED)
            if result.suspect_peer:
                assert result.referee == TRUSTED_VERIFIER
                suspects.append(result.suspect_peer)
    assert set(suspects) == {"colluder-1", "colluder-2"} and len(suspects) == 40
    assert spot.policy.passed.get("colluder-1", 0) == spot.policy.passed.get("colluder-2", 0) == 0  # records lost


def test_an_operator_run_server_is_a_trusted_verifier_too():
    """For spans the coordinator cannot hold (SPOT_CHECK_TRUSTED_PEERS): its output settles, it never verifies as
    a stranger."""
    servers = {"honest": honest, "colluder-1": agreed_lie, "colluder-2": agreed_lie, "ops": honest}
    spot = checker(servers, {"honest": "w1", "colluder-1": "w2", "colluder-2": "w3", "ops": "w0"}, trusted=False)
    spot.trusted_peers = frozenset({"ops"})
    assert "ops" not in {peer for peer, _d, _w in spot.eligible(spot.forward.candidates(0, 4, {"honest"}), "honest")}
    for _ in range(10):
        (result,) = spot.check(job_for("honest"))
        assert (result.verdict.outcome, result.referee) == (VERIFIER_FAILED, "ops")
        assert result.suspect_peer in ("colluder-1", "colluder-2")


def test_a_liar_and_its_accomplice_verifier_are_both_suspects():
    spot = checker({"cheater": agreed_lie, "accomplice": agreed_lie}, {"cheater": "w1", "accomplice": "w2"})
    results = spot.check(job_for("cheater", served=lambda h: truth(h) * 2))  # disagrees with its accomplice too
    assert {(r.verdict.outcome, r.suspect_peer) for r in results} == {(FAILED, "cheater"),
                                                                       (VERIFIER_FAILED, "accomplice")}


def test_an_inconclusive_check_is_held_and_settled_later():
    reported = []
    spot = checker({"checked": honest, "liar": agreed_lie}, {"checked": "w1", "liar": "w2"}, trusted=False)
    spot.on_result = reported.append
    job = job_for("checked")
    spot._check_and_report(job)
    assert [r.verdict.outcome for r in reported] == [INCONCLUSIVE] and job.held and list(spot.unsettled) == [job]
    spot._check_and_report(spot.unsettled.popleft())  # still nobody to settle it: held, not recorded twice
    assert len(reported) == 1 and list(spot.unsettled) == [job]
    spot.trusted = ScriptedTrusted()  # the trusted verifier is back
    spot._check_and_report(spot.unsettled.popleft())
    assert [r.verdict.outcome for r in reported] == [INCONCLUSIVE, VERIFIER_FAILED] and not spot.unsettled
    assert reported[-1].job.held  # the consequences release the hold


def test_a_verifier_that_does_not_answer_proves_nothing():
    def stall(hidden):
        raise TimeoutError("no answer")

    spot = checker({"checked": honest, "staller": stall}, {"checked": "w1", "staller": "w2"})
    (result,) = spot.check(job_for("checked"))  # the trusted verifier checks instead
    assert (result.verdict.outcome, result.verifier) == (PASSED, TRUSTED_VERIFIER)
    spot.trusted = None
    (result,) = spot.check(job_for("checked"))  # nobody else: inconclusive (held), nobody blamed
    assert (result.verdict.outcome, result.suspect_peer) == (INCONCLUSIVE, None)


# ------------------------------------------------------------------------------------- the money, real schema


async def _contributions(pool, **where):
    (column, value), = where.items()
    return await pool.fetch(f"SELECT * FROM far_session_contributions WHERE {column} = $1", value)


def _consequences(store, loop, quarantined: list):
    return CheckConsequences(store, loop, quarantine_after=2,
                             on_quarantine=lambda peer, why: quarantined.append(peer))


async def test_inconclusive_holds_payment_until_settled(clean_db):
    import asyncio

    store = CheckStore(clean_db)
    spot = checker({"liar": agreed_lie}, {}, trusted=False)
    async with clean_db.acquire() as conn:
        session = await seed_session(conn, [(wallet(301), 10)], completion_tokens=100)
    peer = f"peer-{wallet(301)}-0"
    await ensure_node_for(clean_db, wallet(302), "liar")
    spot.registry = {"liar": wallet(302).lower(), peer: wallet(301).lower()}
    consequences = _consequences(store, asyncio.get_running_loop(), [])
    job = job_for(peer, session_id=str(session))
    (result,) = spot.check(job)
    assert result.verdict.outcome == INCONCLUSIVE
    await consequences.apply(result)
    async with clean_db.acquire() as conn:
        assert await load_dues(conn, now()) == []  # held: not paid
        (row,) = await _contributions(clean_db, session_id=session)
        assert row["held_at"] is not None and "inconclusive" in row["held_reason"] and row["payment_far"] > 0
    job.held = True
    spot.trusted = ScriptedTrusted()
    for result in spot.check(job):
        await consequences.apply(result)
    async with clean_db.acquire() as conn:
        assert [d.wallet for d in await load_dues(conn, now())] == [wallet(301)]  # settled: the honest work is paid
        assert (await check_conservation(conn)).ok


async def ensure_node_for(pool, address: str, peer_id: str):
    async with pool.acquire() as conn:
        return await ensure_node(conn, address, peer_id)


async def test_quarantine_follows_the_wallet(clean_db):
    from services.discovery.store import NodeStore

    store = CheckStore(clean_db)
    cheat_wallet, honest_wallet = wallet(311), wallet(312)
    await ensure_node_for(clean_db, cheat_wallet, "QmOldKey")
    await ensure_node_for(clean_db, honest_wallet, "QmHonest")
    await store.quarantine("QmOldKey", "2 failed spot checks", 2)
    # the cheater re-registers its wallet under a fresh key
    await ensure_node_for(clean_db, cheat_wallet.lower(), "QmNewKey")
    quarantined = await store.quarantined()
    assert set(quarantined) == {"QmOldKey", "QmNewKey"} and "QmOldKey" in quarantined["QmNewKey"]
    assert await store.covered_peers("QmOldKey") == ["QmNewKey", "QmOldKey"]

    class Swarm:  # the coordinator's side of sync_quarantine
        def __init__(self):
            self.quarantined, self.spot_checker = set(), None

        def quarantine(self, peer):
            self.quarantined.add(peer)

        def unquarantine(self, peer):
            self.quarantined.discard(peer)

    swarm = Swarm()
    assert (await sync_quarantine(store, swarm))[0] == {"QmOldKey", "QmNewKey"}  # routing excludes both
    nodes = {r["peer_id"]: r for r in await NodeStore(clean_db).nodes(include_unregistered=True)}
    assert nodes["QmNewKey"]["quarantine_reason"].startswith(f"wallet {cheat_wallet} is quarantined")
    assert nodes["QmHonest"]["quarantine_reason"] is None
    # lifting (an operator's recorded decision), named by the new key: the wallet's quarantine is lifted
    lift = await store.lift("QmNewKey", lifted_by="ops", reason="wallet owner identified, hardware replaced")
    assert (lift["peer_id"], lift["wallet_address"]) == ("QmOldKey", cheat_wallet)
    assert await store.quarantined() == {}
    assert (await sync_quarantine(store, swarm))[1] == {"QmOldKey", "QmNewKey"}


async def _account(pool, amount: str) -> str:
    async with pool.acquire() as conn:
        account = await conn.fetchval("INSERT INTO far_accounts (name) VALUES ('refund-test') RETURNING account_id")
        await conn.execute("SELECT far_credit_account($1, $2, 'grant')", account, Decimal(amount))
    return str(account)


async def _failed_check_of(pool, session_id, peer: str) -> None:
    await pool.execute(
        """INSERT INTO far_spot_checks (session_id, model_id, checked_peer_id, blocks, positions, prefix_length,
               verifier_peer_id, referee_peer_id, outcome, suspect_peer_id, error, tolerance, dtype)
           VALUES ($1, 'm', $2, '0:4', 1, 5, 'QmVerifier', $3, 'failed', $2, 0.5, 1e-4, 'float32')""",
        uuid.UUID(str(session_id)), peer, TRUSTED_VERIFIER)


@pytest.mark.parametrize("proof", ["during", "after"])
async def test_a_session_proven_wrong_is_refunded_once(make_database, proof):
    # a database of its own: the accounts' books are audited whole (clean_db keeps accounts across tests)
    pool = await asyncpg.create_pool(make_database(), min_size=1, max_size=4)
    try:
        await _refund_scenario(pool, proof)
    finally:
        await pool.close()


class _Rollback(Exception):
    pass


async def _refund_scenario(clean_db, proof):
    from services.coordinator.account_service import AccountService
    from services.coordinator.accounts import AccountStore, Principal
    from services.deposits.audit import check_accounts

    account = await _account(clean_db, "10")
    sessions, store = SessionStore(clean_db), CheckStore(clean_db)
    cheater, other = wallet(321), wallet(322)
    await ensure_node_for(clean_db, cheater, "QmCheater")
    await ensure_node_for(clean_db, other, "QmOther")
    pricing = Pricing(Decimal("0.01"), Decimal(0), 1000)
    session = await sessions.create_session(request_id="req-wrong", model_id="m", pricing=pricing, prompt_tokens=0,
                                            account_id=account, reserved_far=Decimal("5"))
    await sessions.checkpoint(session, 300, [PeerWork("QmCheater", 30, 30, {(0, 2)}),
                                             PeerWork("QmOther", 30, 30, {(2, 4)})])
    if proof == "during":  # the check lands while the stream runs: refunded as the session is finalized
        await _failed_check_of(clean_db, session, "QmCheater")
        await store.dispute(session, "QmCheater", "0:2", "failed")
    final = await sessions.finalize(session, status="completed", finish_reason="length", prompt_tokens=0,
                                    completion_tokens=300)
    assert final.cost_far == Decimal("3")
    if proof == "after":
        assert final.refunded_far is None
        await _failed_check_of(clean_db, session, "QmCheater")
        await store.dispute(session, "QmCheater", "0:2", "failed")
        assert await store.refund(session, "proven wrong") == Decimal("3")
    assert await store.refund(session, "again") == 0  # once per session
    final = await sessions.read_session(session)
    assert final.refunded_far == Decimal("3") and final.cost_far == Decimal("3")  # the charge stays on record
    balance = await clean_db.fetchrow("SELECT balance_far, reserved_far FROM far_accounts WHERE account_id = $1",
                                      uuid.UUID(account))
    assert (balance["balance_far"], balance["reserved_far"]) == (Decimal("10"), 0)  # all of it back
    ledger = await clean_db.fetch("SELECT * FROM far_account_ledger WHERE account_id = $1 AND kind = 'refund'",
                                  uuid.UUID(account))
    assert [(r["amount_far"], str(r["session_id"])) for r in ledger] == [(Decimal("3"), session)]
    principal = Principal(account, "k", 600)
    service = AccountService(AccountStore(clean_db), None, None)
    usage = await service.usage(principal, limit=10, before=None, days=7)
    assert usage["requests"][0]["refunded_far"] == "3" and usage["requests"][0]["refund_reason"]
    entries = (await service.ledger(principal, limit=10, before=None))["entries"]
    assert any(e["kind"] == "refund" and e["request_id"] == "req-wrong" and e["amount_far"] == "3" for e in entries)
    assert (await service.balance(principal))["refunded_far"] == "3"
    # the honest provider is still paid its share (the platform bears the refund); the books balance
    rows = {r["peer_id"]: r for r in await _contributions(clean_db, session_id=uuid.UUID(session))}
    assert rows["QmOther"]["payment_far"] == Decimal("1.35") and rows["QmCheater"]["withheld_far"] == Decimal("1.35")
    async with clean_db.acquire() as conn:
        assert (await check_conservation(conn)).ok
        accounts = await check_accounts(conn)
        assert accounts.ok, accounts.problems
    other_session = await sessions.create_session(request_id="req-fine", model_id="m", pricing=pricing,
                                                  prompt_tokens=0, account_id=account, reserved_far=Decimal("1"))
    await sessions.finalize(other_session, status="completed", finish_reason="length", prompt_tokens=0,
                            completion_tokens=10)
    assert await store.refund(other_session, "no proof") == 0  # no failed check: no refund
    async with clean_db.acquire() as conn:
        with pytest.raises(_Rollback):
            async with conn.transaction():  # a refund without a proof is caught by the audit
                await conn.execute("INSERT INTO far_account_ledger (account_id, kind, amount_far, session_id, "
                                   "balance_after_far) VALUES ($1, 'refund', 0.1, $2, 0)", uuid.UUID(account),
                                   uuid.UUID(other_session))
                await conn.execute("UPDATE far_accounts SET balance_far = balance_far + 0.1 WHERE account_id = $1",
                                   uuid.UUID(account))
                bad = await check_accounts(conn)
                assert not bad.ok and any("refund" in p for p in bad.problems), bad.problems
                raise _Rollback


async def test_an_intermittent_cheater_is_quarantined_and_paid_nothing(clean_db):
    """A server corrupting 10 % of its steps, checked at the default rates (new-server rate 25 % until a clean
    record, SPOT_CHECK_QUARANTINE_AFTER = 2): quarantined within the bound of docs/verification.md, and every
    contribution of its wallet, caught or not, forfeited: paid 0. The honest wallet is paid in full."""
    import asyncio

    rng = random.Random(6)  # a run where it takes 5 sessions: 3 of them never caught by a check
    store = CheckStore(clean_db)
    quarantined: list = []
    consequences = _consequences(store, asyncio.get_running_loop(), quarantined)
    honest_wallet, cheat_wallet = wallet(331), wallet(332)
    cheater_peer, honest_peer = f"peer-{cheat_wallet}-1", f"peer-{honest_wallet}-0"
    policy = SamplingPolicy(rate=0.03, new_node_rate=0.25, clean_record=20)
    spot = SpotChecker("m", ScriptedSwarm({honest_peer: honest}), policy, lambda r: None, seed=11,
                       trusted=ScriptedTrusted())
    # 17 steps: a 16-token answer; the bound (99.9 %, docs/verification.md "Threat model") is 127 such sessions
    steps_per_session, bound_sessions = 17, 127
    sessions = []
    for _index in range(bound_sessions + 1):
        async with clean_db.acquire() as conn:
            session = await seed_session(conn, [(honest_wallet, 17), (cheat_wallet, 17)], completion_tokens=16,
                                         finalize=False)
        sessions.append(session)
        spot.registry = {honest_peer: honest_wallet.lower(), cheater_peer: cheat_wallet.lower()}
        for _step in range(steps_per_session):
            lie = rng.random() < 0.10
            if spot.random.random() >= policy.rate_for(cheater_peer):
                continue
            job = job_for(cheater_peer, session_id=str(session), served=(agreed_lie if lie else honest))
            for result in spot.check(job):
                await consequences.apply(result)
        async with clean_db.acquire() as conn:
            await conn.execute("SELECT finalize_session($1, 'completed', 'length', 0, 16)", session)
        if quarantined:
            break
    print(f"\nintermittent cheater (10 %): quarantined after {len(sessions)} sessions of {steps_per_session} steps")
    assert quarantined == [cheater_peer] and len(sessions) <= bound_sessions
    rows = await clean_db.fetch("SELECT * FROM far_session_contributions")
    cheats = [r for r in rows if r["peer_id"] == cheater_peer]
    assert cheats and all(r["payment_far"] == 0 and r["withheld_far"] > 0 and r["disputed_at"] for r in cheats)
    reasons = {r["withheld_reason"] for r in cheats}
    assert reasons == {"disputed", "forfeited"}  # the sessions no check caught are forfeited too
    assert all(r["payment_far"] > 0 and r["disputed_at"] is None for r in rows if r["peer_id"] == honest_peer)
    # a session it still serves (another coordinator routed it before syncing) is forfeited as it is written
    async with clean_db.acquire() as conn:
        late = await seed_session(conn, [(cheat_wallet, 5)], completion_tokens=5)
        (late_row,) = await _contributions(clean_db, session_id=late)
        assert late_row["withheld_reason"] == "forfeited" and late_row["payment_far"] == 0
        dues = {d.wallet: d.amount_far for d in await load_dues(conn, now())}
        assert cheat_wallet not in dues and dues[honest_wallet] == sum(
            r["payment_far"] for r in rows if r["peer_id"] == honest_peer)
        conservation = await check_conservation(conn)
    assert conservation.ok, conservation.problems
    assert any("forfeited by a quarantined wallet" in note for note in conservation.notes)

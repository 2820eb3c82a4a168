"""Spot checks (issue 17): the comparison and sampling rules (pure), and the money consequences of a dispute on
the real schema: the payment is withheld (platform), the user's charge unchanged, the planner skips it, and
``far-mesh audit``'s conservation still balances (and catches a dispute that would create or lose money)."""

from __future__ import annotations

from decimal import Decimal

import asyncpg
import pytest
import torch

from services.coordinator.checks import CheckStore
from services.coordinator.verification import (FAILED, INCONCLUSIVE, PASSED, VERIFIER_FAILED, SamplingPolicy,
                                               adjudicate, relative_error, tolerance_for)
from services.payouts.audit import check_conservation
from services.payouts.planner import load_dues
from tests.payouts_support import now, seed_session, wallet


def test_relative_error_is_per_position():
    base = torch.randn(1, 50, 16)
    assert relative_error(base, base.clone()) == 0.0
    corrupted = base.clone()
    corrupted[0, 7] *= 1.5  # one position of fifty: not averaged away
    assert relative_error(corrupted, base) == pytest.approx(0.5, rel=1e-5)
    assert relative_error(base[:, :3], base) == float("inf")  # a server that returns the wrong shape
    nan = base.clone()
    nan[0, 0, 0] = float("nan")
    assert relative_error(nan, base) == float("inf")


def test_tolerance_is_the_coarsest_dtype():
    assert tolerance_for("float32", "float32") < tolerance_for("float16") < tolerance_for("bfloat16")
    # servers of different dtypes disagree more (bench/calibrate_tolerance.py): the coarsest dtype's mixed tolerance
    assert tolerance_for("float32", "bfloat16") == tolerance_for("bfloat16", "float16", "bfloat16") == 3e-1
    assert tolerance_for("float16", "float32", "float16") == 5e-2 > tolerance_for("float16", "float16") == 2e-2
    assert tolerance_for("float32", "bfloat16") > tolerance_for("bfloat16", "bfloat16")
    assert tolerance_for("torch.float32") == tolerance_for("float32")
    assert tolerance_for("torch.float16", "float16") == tolerance_for("float16")  # one dtype, two spellings
    assert tolerance_for(None) == tolerance_for("float32", "bfloat16")  # unknown: the loosest
    assert tolerance_for("float32", None) == tolerance_for("float32", "bfloat16")


def test_adjudicate_names_the_outlier():
    honest = torch.randn(1, 4, 32)
    noise = 1e-6 * torch.randn(1, 4, 32)  # honest disagreement, well under the float32 tolerance
    bad = honest + 0.05 * honest.norm(dim=-1, keepdim=True) * torch.randn(1, 4, 32) / 32 ** 0.5
    tol = tolerance_for("float32")
    assert adjudicate(honest + noise, honest, None, tol).outcome == PASSED
    assert adjudicate(bad, honest, None, tol).outcome == INCONCLUSIVE  # two disagree, nobody to settle it
    verdict = adjudicate(bad, honest, honest + noise, tol)
    assert (verdict.outcome, verdict.suspect) == (FAILED, "checked") and verdict.referee_checked > tol
    assert adjudicate(honest, bad, honest + noise, tol).outcome == VERIFIER_FAILED
    assert adjudicate(honest, bad, bad * 2, tol).outcome == INCONCLUSIVE  # three disagree


def test_new_servers_are_sampled_more_until_clean():
    policy = SamplingPolicy(rate=0.02, new_node_rate=0.5, clean_record=3)
    assert policy.rate_for("p") == 0.5
    for _ in range(3):
        policy.record("p", True)
    assert policy.rate_for("p") == 0.02
    policy.record("p", False)  # a failure: sampled at the high rate again until a clean record
    assert policy.rate_for("p") == 0.5
    assert SamplingPolicy(rate=0).rate_for("p") == 0.0  # off is off


async def _contributions(conn, session_id):
    return {r["wallet_address"]: r for r in await conn.fetch(
        "SELECT * FROM far_session_contributions WHERE session_id = $1", session_id)}


@pytest.mark.parametrize("when", ["before_finalize", "after_finalize"])
async def test_dispute_withholds_payment_for_the_platform(clean_db, when):
    honest, cheater = wallet(101), wallet(102)
    store = CheckStore(clean_db)
    async with clean_db.acquire() as conn:
        session = await seed_session(conn, [(honest, 30), (cheater, 10)], completion_tokens=400,
                                     finalize=when == "after_finalize")
        cheater_peer = f"peer-{cheater}-1"
        if when == "before_finalize":
            assert await store.dispute(str(session), cheater_peer, "0:4", "failed a spot check") is None
            await conn.execute("SELECT finalize_session($1, 'completed', 'length', 0, 400)", session)
        else:
            before = await _contributions(conn, session)
            assert before[cheater]["payment_far"] > 0
            assert await store.dispute(str(session), cheater_peer, "0:4", "failed a spot check") is None
        rows = await _contributions(conn, session)
        final = await conn.fetchrow("SELECT cost_far, fee_far FROM far_mesh_sessions WHERE session_id = $1", session)
    # price 0.01 x 400 = 4 FAR; 10 % fee; the providers' 3.6 FAR split 30:10
    assert final["cost_far"] == Decimal("4") and final["fee_far"] == Decimal("0.4")  # the user's charge unchanged
    assert rows[honest]["payment_far"] == Decimal("2.7") and rows[honest]["disputed_at"] is None
    assert rows[cheater]["payment_far"] == 0 and rows[cheater]["withheld_far"] == Decimal("0.9")
    assert rows[cheater]["dispute_reason"] == "failed a spot check"
    async with clean_db.acquire() as conn:
        assert (await check_conservation(conn)).ok
        dues = {d.wallet: d.amount_far for d in await load_dues(conn, now())}
    assert dues == {honest: Decimal("2.7")}  # the cheater's wallet is owed nothing


async def test_dispute_of_an_unseen_peer_before_its_first_checkpoint(clean_db):
    """A check can finish before the session checkpointed the peer: the next checkpoint fills in the work."""
    cheater = wallet(103)
    async with clean_db.acquire() as conn:
        session = await seed_session(conn, [(wallet(104), 5)], completion_tokens=100, finalize=False)
        from tests.payouts_support import ensure_node

        await ensure_node(conn, cheater, "late-peer")
    await CheckStore(clean_db).dispute(str(session), "late-peer", "2:4", "failed")
    async with clean_db.acquire() as conn:
        await conn.execute("UPDATE far_session_contributions SET work_units = 5, steps = 1 "
                           "WHERE session_id = $1 AND peer_id = 'late-peer'", session)  # the checkpoint's upsert
        await conn.execute("SELECT finalize_session($1, 'completed', 'length', 0, 100)", session)
        rows = await _contributions(conn, session)
        assert rows[cheater]["payment_far"] == 0 and rows[cheater]["withheld_far"] == Decimal("0.45")
        assert (await check_conservation(conn)).ok


async def test_conservation_catches_money_made_or_lost_by_a_dispute(make_database):
    # A database of its own: the broken books it makes on purpose would fail every later audit of a shared one.
    conn = await asyncpg.connect(make_database())
    try:
        session = await seed_session(conn, [(wallet(105), 1), (wallet(106), 1)], completion_tokens=100)
        # the guard lets a finalized payment move to withheld, and nothing else
        with pytest.raises(Exception, match="only written by finalize_session"):
            await conn.execute("UPDATE far_session_contributions SET withheld_far = payment_far, disputed_at = now() "
                               "WHERE session_id = $1", session)  # paid AND withheld: money out of nowhere
        # simulate a broken writer that bypasses the guard (triggers off for this transaction)
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute("UPDATE far_session_contributions SET withheld_far = payment_far, disputed_at = now() "
                               "WHERE session_id = $1", session)
        check = await check_conservation(conn)
    finally:
        await conn.close()
    assert not check.ok and any("cost" in p for p in check.problems)

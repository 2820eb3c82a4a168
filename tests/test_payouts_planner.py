"""Planner: pure splitting rules (property-based) and the SQL aggregation over the real schema."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.money import to_base_units
from services.payouts.planner import (
    WalletDue,
    build_plan,
    max_recipients_for_gas,
    plan_payouts,
)
from tests.payouts_support import now, seed_session, wallet

amounts = st.decimals(min_value=Decimal("0.000000000000000001"), max_value=Decimal("100000"), places=18,
                      allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(dues=st.dictionaries(st.integers(0, 400), amounts, max_size=60), max_recipients=st.integers(1, 25),
       minimum=st.decimals(min_value=0, max_value=50, places=2))
def test_plan_partitions_wallets(dues, max_recipients, minimum):
    rows = [WalletDue(wallet(i), amount, 1, 1) for i, amount in dues.items()]
    plan = plan_payouts(rows, min_payout_far=minimum, max_recipients=max_recipients)
    paid = plan.payable
    assert all(len(b.items) <= max_recipients for b in plan.batches)
    assert all(b.items for b in plan.batches)
    assert {d.wallet for d in paid} | {d.wallet for d in plan.carried_over} == {r.wallet for r in rows}
    assert not {d.wallet for d in paid} & {d.wallet for d in plan.carried_over}
    assert all(d.amount_far >= minimum for d in paid) and all(d.amount_far < minimum for d in plan.carried_over)
    assert plan.total_far + plan.carried_over_far == sum((r.amount_far for r in rows), Decimal(0))
    assert sum(sum(b.amounts_base) for b in plan.batches) == to_base_units(plan.total_far)
    # deterministic regardless of input order
    again = plan_payouts(list(reversed(rows)), min_payout_far=minimum, max_recipients=max_recipients)
    assert again == plan


def test_same_wallet_in_different_case_is_merged():
    w = wallet(9)
    plan = plan_payouts([WalletDue(w.lower(), Decimal("6"), 1, 1), WalletDue(w, Decimal("5"), 2, 2)],
                        min_payout_far=Decimal("10"), max_recipients=5)
    assert [(d.wallet, d.amount_far, d.session_count) for d in plan.payable] == [(w, Decimal("11"), 3)]


def test_zero_address_is_never_paid():
    plan = plan_payouts([WalletDue("0x" + "0" * 40, Decimal("50"))], min_payout_far=Decimal(1), max_recipients=5)
    assert plan.batches == () and len(plan.skipped) == 1


def test_exact_base_units_and_no_floats():
    assert to_base_units(Decimal("1.000000000000000001")) == 10**18 + 1
    with pytest.raises(ValueError):
        to_base_units(Decimal("0.0000000000000000001"))
    with pytest.raises(TypeError):
        to_base_units(0.1)  # type: ignore[arg-type]


def test_gas_cap_limits_batch_size():
    assert max_recipients_for_gas(10_000_000, 200) == 200
    assert max_recipients_for_gas(1_000_000, 200) == 23
    assert max_recipients_for_gas(100_000, 200) == 1


async def test_sql_aggregation_rules(clean_db):
    a, b, c, d = wallet(11), wallet(12), wallet(13), wallet(14)
    async with clean_db.acquire() as conn:
        await seed_session(conn, [(a, 1), (b, 1), (None, 2)], completion_tokens=3000)   # a, b: 6.75 each
        await seed_session(conn, [(a, 1)], completion_tokens=1000, wallet_case="lower")  # a: +9
        await seed_session(conn, [(c, 1)], completion_tokens=5000, finalize=False)       # running: not eligible
        late_cutoff = now()
        await seed_session(conn, [(d, 1)], completion_tokens=5000)                       # after the cutoff
        plan = await build_plan(conn, cutoff=late_cutoff, min_payout_far=Decimal("10"), max_recipients=10)
        assert [(x.wallet, x.amount_far, x.session_count) for x in plan.payable] == [(a, Decimal("15.75"), 2)]
        assert [(x.wallet, x.amount_far) for x in plan.carried_over] == [(b, Decimal("6.75"))]
        plan = await build_plan(conn, cutoff=now() + timedelta(seconds=1), min_payout_far=Decimal("10"),
                                max_recipients=10)
        assert {x.wallet for x in plan.payable} == {a, d}

"""Money rules (pure) and their agreement with the authoritative SQL finalize_session()."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.money import (
    format_far,
    format_far_truncated,
    from_base_units,
    parse_far,
    session_cost,
    split_session,
    to_base_units,
)


prices = st.integers(min_value=0, max_value=10**18).map(from_base_units)


def test_base_units_are_exact():
    assert to_base_units(Decimal("0.0001")) == 10**14
    assert from_base_units(1) == Decimal("1e-18")
    with pytest.raises(ValueError):
        to_base_units(Decimal("1e-19"))
    with pytest.raises(TypeError):
        to_base_units(0.1)  # floats are refused
    assert format_far(Decimal("0.0048000")) == "0.0048"
    assert format_far(Decimal("100")) == "100" and format_far(Decimal("-0")) == "0"


def test_display_and_parsing_never_round_up():
    # A status line shows earnings rounded down: never more than was earned.
    assert format_far_truncated("0.00009") == "0.0000" and format_far_truncated("1.99999") == "1.9999"
    assert format_far_truncated("12") == "12.0000" and format_far_truncated("nonsense") == "-"
    assert parse_far("0.000000000000000001") == Decimal("1e-18")
    for bad in ("1e-19", "0", "-1", "NaN", "Infinity", "ten"):
        with pytest.raises(ValueError):
            parse_far(bad)


@given(cost=prices, bps=st.integers(0, 10_000),
       units=st.dictionaries(st.text(min_size=1, max_size=4), st.integers(0, 10**9), max_size=8),
       unregistered=st.sets(st.text(min_size=1, max_size=4), max_size=3))
def test_split_conserves_exactly(cost, bps, units, unregistered):
    registered = set(units) - unregistered
    split = split_session(cost, bps, units, registered)
    assert split.fee + sum(split.payments.values(), Decimal(0)) == cost
    assert all(p >= 0 for p in split.payments.values())
    assert all(split.payments[k] == 0 for k in units if k not in registered)
    pool = cost * (10_000 - bps) / 10_000
    assert sum(split.payments.values(), Decimal(0)) <= pool
    assert split.fee >= cost * bps / 10_000 if units else split.fee == cost


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(completion=st.integers(0, 5000), prompt=st.integers(0, 5000), price=prices, prompt_price=prices,
       bps=st.integers(0, 10_000), units=st.lists(st.integers(0, 10**7), min_size=0, max_size=5),
       registered_mask=st.lists(st.booleans(), min_size=5, max_size=5))
async def test_python_split_matches_sql_finalize_session(db_pool, completion, prompt, price, prompt_price, bps, units,
                                                         registered_mask):
    request_id = f"prop_{uuid.uuid4().hex}"
    session_id = await db_pool.fetchval(
        """INSERT INTO far_mesh_sessions (request_id, model_id, price_per_token_far, price_per_prompt_token_far,
               platform_fee_bps) VALUES ($1, 'm', $2, $3, $4) RETURNING session_id""",
        request_id, price, prompt_price, bps)
    work, registered = {}, set()
    for index, amount in enumerate(units):
        peer = f"Qm{uuid.uuid4().hex}"
        node_id = None
        if registered_mask[index]:
            node_id = await db_pool.fetchval(
                "INSERT INTO far_nodes (peer_id, wallet_address, model_id, start_block, end_block) "
                "VALUES ($1, $2, 'm', 0, 2) RETURNING node_id", peer, "0x" + "1" * 40)
            registered.add(peer)
        await db_pool.execute(
            "INSERT INTO far_session_contributions (session_id, peer_id, node_id, blocks, work_units) "
            "VALUES ($1, $2, $3, '0:2', $4)", session_id, peer, node_id, amount)
        work[peer] = amount
    await db_pool.execute("SELECT finalize_session($1, 'completed', 'length', $2, $3)", session_id, prompt, completion)
    row = await db_pool.fetchrow("SELECT cost_far, fee_far FROM far_mesh_sessions WHERE session_id = $1", session_id)
    paid = {r["peer_id"]: r["payment_far"] for r in await db_pool.fetch(
        "SELECT peer_id, payment_far FROM far_session_contributions WHERE session_id = $1", session_id)}

    cost = session_cost(completion, prompt, price, prompt_price)
    expected = split_session(cost, bps, work, registered)
    assert row["cost_far"] == cost
    assert paid == expected.payments
    assert row["fee_far"] == expected.fee
    assert row["fee_far"] + sum(paid.values(), Decimal(0)) == row["cost_far"]

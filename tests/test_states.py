"""The state enums of services/common/states.py are the words the schema's CHECK constraints allow, no more, no
less; and the executor's transition table is the one the database trigger enforces."""

from __future__ import annotations

import re
import typing

import asyncpg
import pytest

from services.common.states import (OPEN_BATCH_STATES, BatchState, DepositState, FinishReason, NodeState, ServedBy,
                                    SessionStatus, SpotCheckOutcome)
from services.payouts.executor import TRANSITIONS

MIRRORED = [("far_mesh_sessions", "status", SessionStatus), ("far_payment_batches", "state", BatchState),
            ("far_nodes", "state", NodeState), ("far_deposits", "state", DepositState),
            ("far_mesh_sessions", "served_by", ServedBy), ("far_spot_checks", "outcome", SpotCheckOutcome)]


@pytest.mark.parametrize("table,column,enum", MIRRORED, ids=[f"{t}.{c}" for t, c, _ in MIRRORED])
async def test_enum_mirrors_the_check_constraint(postgres_url, table, column, enum):
    conn = await asyncpg.connect(postgres_url)
    try:
        definition = await conn.fetchval(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE contype = 'c' AND conname = $1",
            f"{table}_{column}_check")
    finally:
        await conn.close()
    assert definition is not None, f"no CHECK on {table}.{column}"
    assert re.findall(r"'([a-z_]+)'::text", definition) == [member.value for member in enum]


def test_transition_table_covers_every_batch_state():
    assert set(TRANSITIONS) == set(BatchState)
    terminal = {state for state, targets in TRANSITIONS.items() if not targets}
    assert terminal == {BatchState.FAILED}
    assert set(OPEN_BATCH_STATES) == set(BatchState) - {BatchState.CONFIRMED, BatchState.FAILED}
    # Only a batch never signed can fail (a signed one may be mined at any time: it waits or is re-sent under the
    # same batch id); a reorg can take a confirmed batch back to submitted. Happy path: planned -> signed ->
    # submitted -> confirmed.
    assert [state for state in BatchState if BatchState.FAILED in TRANSITIONS[state]] == [BatchState.PLANNED]
    assert TRANSITIONS[BatchState.CONFIRMED] == {BatchState.SUBMITTED}


def test_the_wire_models_carry_the_same_words():
    from services.coordinator.protocol import DoneEvent, InferenceStatus

    def words(model, field):
        return list(typing.get_args(model.model_fields[field].annotation))

    assert words(DoneEvent, "finish_reason") == [member.value for member in FinishReason]
    assert words(DoneEvent, "served_by") == words(InferenceStatus, "served_by") == [member.value for member in ServedBy]
    assert words(InferenceStatus, "status") == [member.value for member in SessionStatus]
    schema = DoneEvent.model_json_schema()["properties"]["finish_reason"]
    assert schema == {"enum": ["length", "stop", "eos", "cancelled"], "title": "Finish Reason", "type": "string"}


def test_every_finish_reason_has_an_openai_word():
    from services.coordinator.openai_protocol import openai_finish_reason

    assert {reason: openai_finish_reason(reason) for reason in FinishReason} == {
        "length": "length", "stop": "stop", "eos": "stop", "cancelled": "stop"}

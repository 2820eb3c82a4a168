"""Property: over many random sessions (sizes, fees, prices, spans, failovers with replays, repeated
checkpoints), the recorded contributions and fee add up exactly to the session's cost, and the split follows
the work rule — through the real metering, checkpoint and finalize code on the real database."""

from __future__ import annotations

import uuid
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.money import from_base_units, session_cost, split_session
from services.coordinator.metering import WorkMeter
from services.coordinator.store import Pricing, SessionStore


@st.composite
def sessions(draw):
    num_blocks = draw(st.integers(1, 12))
    cuts = sorted(draw(st.sets(st.integers(1, num_blocks - 1), max_size=num_blocks - 1))) if num_blocks > 1 else []
    bounds = [0, *cuts, num_blocks]
    spans = list(zip(bounds, bounds[1:]))
    prompt = draw(st.integers(1, 300))
    completion = draw(st.integers(1, 200))
    # per span: token indices (1..completion-1) at which its server dies and a replacement takes over
    failovers = [sorted(draw(st.sets(st.integers(1, max(1, completion - 1)), max_size=2))) for _ in spans]
    registered = [draw(st.booleans()) for _ in range(sum(len(f) + 1 for f in failovers))]
    return dict(spans=spans, prompt=prompt, completion=completion, failovers=failovers, registered=registered,
                bps=draw(st.integers(0, 10_000)),
                price=from_base_units(draw(st.integers(0, 10**16))),
                prompt_price=from_base_units(draw(st.integers(0, 10**15))),
                checkpoints=draw(st.sets(st.integers(1, completion), max_size=5)))


def simulate(case, record, on_checkpoint):
    """Replays a session's steps into ``record(peer, start, end, positions)``, the way the engine's observer
    sees them: prefill, then one position per step; a replacement server replays the processed prefix."""
    servers = [f"Qm{uuid.uuid4().hex}" for _ in range(sum(len(f) + 1 for f in case["failovers"]))]
    current, next_server = [], 0
    for _ in case["spans"]:
        current.append(servers[next_server])
        next_server += 1
    for step in range(case["completion"]):  # step 0 = prefill; the last sampled token is not sent back
        for index, (start, end) in enumerate(case["spans"]):
            positions = case["prompt"] if step == 0 else 1
            if step in case["failovers"][index]:
                current[index] = servers[next_server]
                next_server += 1
                positions = case["prompt"] + step  # replay of the processed prefix + the current token
            record(current[index], start, end, positions)
        if step + 1 in case["checkpoints"]:
            on_checkpoint(step + 1)
    return servers


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=sessions())
async def test_random_sessions_conserve_money_exactly(db_pool, case):
    store = SessionStore(db_pool)
    pricing = Pricing(case["price"], case["prompt_price"], case["bps"])
    session_id = await store.create_session(request_id=f"prop_{uuid.uuid4().hex}", model_id="m", pricing=pricing,
                                            prompt_tokens=case["prompt"])
    meter = WorkMeter()
    snapshots = []
    servers = simulate(case, meter.record, lambda tokens: snapshots.append((tokens, meter.snapshot())))
    registered = {peer for peer, flag in zip(servers, case["registered"]) if flag}
    for peer in registered:
        await db_pool.execute("INSERT INTO far_nodes (peer_id, wallet_address, model_id, start_block, end_block) "
                              "VALUES ($1, $2, 'm', 0, 1)", peer, "0x" + uuid.uuid4().hex[:8] * 5)
    for tokens, snapshot in snapshots:
        await store.checkpoint(session_id, tokens, snapshot)
        await store.checkpoint(session_id, tokens, snapshot)  # a retried checkpoint never double counts
    await store.checkpoint(session_id, case["completion"], meter.snapshot())
    final = await store.finalize(session_id, status="completed", finish_reason="length",
                                 prompt_tokens=case["prompt"], completion_tokens=case["completion"])

    cost = session_cost(case["completion"], case["prompt"], case["price"], case["prompt_price"])
    work = {w.peer_id: w.work_units for w in meter.snapshot()}
    assert final.cost_far == cost
    assert final.fee_far + sum((c.payment_far for c in final.contributions), Decimal(0)) == cost
    assert {c.peer_id: c.work_units for c in final.contributions} == work
    assert {c.peer_id: c.payment_far for c in final.contributions} == split_session(cost, case["bps"], work,
                                                                                    registered).payments
    again = await store.finalize(session_id, status="failed", finish_reason=None, prompt_tokens=0, completion_tokens=0)
    assert (again.status, again.cost_far, again.fee_far) == ("completed", final.cost_far, final.fee_far)

"""A route's expected cost per token (services/coordinator/route_cost.py): each hop's measured decode step (its
round trip and compute, as the coordinator waits for it), or its ping before any step; unknown stays unknown."""

from __future__ import annotations

import math

from services.common.petals_adapter.failover import StepLatency
from services.coordinator.route_cost import expected_ms_per_token, hop_costs

ROUTE = [{"peer_id": "near", "blocks": "0:2"}, {"peer_id": "far", "blocks": "2:4"}]


def test_each_hop_costs_its_measured_step_or_at_least_its_round_trip():
    hops = hop_costs(ROUTE, {"near": 0.010, "far": 0.160}, {"near": 0.030, "far": 0.200})
    assert hops == [{"peer_id": "near", "blocks": "0:2", "rtt_ms": 10.0, "step_ms": 30.0},
                    {"peer_id": "far", "blocks": "2:4", "rtt_ms": 160.0, "step_ms": 200.0}]
    assert expected_ms_per_token(hops) == 230.0
    before_steps = hop_costs(ROUTE, {"near": 0.010, "far": 0.160}, {})
    assert expected_ms_per_token(before_steps) == 170.0  # the pings: a lower bound


def test_unknown_parts_make_the_total_unknown():
    hops = hop_costs(ROUTE, {"near": 0.010, "far": math.inf}, {"near": 0.030})  # far: no ping answer, no step
    assert hops[1]["rtt_ms"] is None and hops[1]["step_ms"] is None
    assert expected_ms_per_token(hops) is None
    assert expected_ms_per_token([]) is None
    assert expected_ms_per_token([{"peer_id": "x", "blocks": "0:1"}]) is None  # a scripted engine's bare hops


def test_median_decode_step_ignores_prefill_steps():
    latency = StepLatency(window=8)
    assert latency.median_decode("a") is None
    for seconds in (0.05, 0.01, 0.03):
        latency.record("a", seconds, positions=1)
    latency.record("a", 2.0, positions=64)  # a prefill chunk
    assert latency.median_decode("a") == 0.03

"""What a session's route is expected to cost per token, from what the coordinator measured.

Petals' client routes an inference session with its "min_latency" graph (``RemoteSequenceManager``): it pings
the servers (client -> server round trips, refreshed with the swarm state), servers publish their pings to the
next servers (``next_pings``), and Dijkstra picks the route with the least delay. Our steps are client-mediated
(each hop's output returns to the coordinator before the next hop), so a token costs, per hop, what the
coordinator waits for that server's step: its round trip plus the server's compute. This module reports that
next to the route (``GET /mesh/inference/{id}``, and a debug log when a generation's first token is out).
"""

from __future__ import annotations

import math
from typing import Optional


def _ms(seconds: Optional[float]) -> Optional[float]:
    return round(seconds * 1000, 1) if seconds is not None and math.isfinite(seconds) else None


def hop_costs(route: list[dict], rtts_s: dict[str, float], steps_s: dict[str, float]) -> list[dict]:
    """``route`` hops ({peer_id, blocks}) with ``rtt_ms`` (the ping; None: not measured or no answer) and
    ``step_ms`` (median decode step as the coordinator waits for it, round trip included; None: no step yet).
    Pure."""
    return [{**hop, "rtt_ms": _ms(rtts_s.get(hop["peer_id"])), "step_ms": _ms(steps_s.get(hop["peer_id"]))}
            for hop in route]


def expected_ms_per_token(hops: list[dict]) -> Optional[float]:
    """Sum over hops of the measured step time, or the ping where no step was seen yet (the compute is then
    missing: a lower bound); None when a hop has neither (a partial sum would flatter the route)."""
    parts = [hop.get("step_ms") if hop.get("step_ms") is not None else hop.get("rtt_ms") for hop in hops]
    if not hops or any(part is None for part in parts):
        return None
    return round(sum(parts), 1)


def measured(session) -> tuple[dict[str, float], dict[str, float]]:
    """(client -> server ping RTTs, median decode step times), in seconds by base58 peer ID, for the servers of a
    Petals ``InferenceSession``."""
    from services.common.petals_adapter.failover import STEP_LATENCY

    rtts = {peer.to_base58(): rtt for peer, rtt in session._sequence_manager.ping_aggregator.to_dict().items()}
    steps = {}
    for server_session in list(session._server_sessions):
        peer = server_session.span.peer_id.to_base58()
        median = STEP_LATENCY.median_decode(peer)
        if median is not None:
            steps[peer] = median
    return rtts, steps

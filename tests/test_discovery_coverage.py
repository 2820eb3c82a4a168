"""Pure coverage computation (services/common/coverage.py): no network, no database."""

from __future__ import annotations

from services.common.coverage import (RegisteredNode, compute_coverage, describe_blocks, format_ranges,
                                      update_joining_since)
from services.common.swarm_state import BlockServer

A = "QmA" + "a" * 43
B = "QmB" + "b" * 43
C = "QmC" + "c" * 43


def servers(num_blocks: int, *announced: tuple[str, int, int, str, str]) -> list[list[BlockServer]]:
    """announced: (peer_id, start, end, state, name)."""
    result = [[] for _ in range(num_blocks)]
    for peer_id, start, end, state, name in announced:
        for block in range(start, end):
            result[block].append(BlockServer(peer_id, state, start, end, name))
    return result


def node(peer_id, start, end, **kw) -> RegisteredNode:
    return RegisteredNode(peer_id=peer_id, node_id=f"id-{peer_id[2]}", start_block=start, end_block=end, **kw)


def test_ranges():
    assert format_ranges([]) == []
    assert format_ranges([5, 2, 3, 7, 8, 9]) == ["2-3", "5", "7-9"]
    assert describe_blocks([2, 3]) == "blocks 2-3"
    assert describe_blocks([4]) == "block 4"
    assert describe_blocks([0, 1, 5]) == "blocks 0-1, 5"


def test_half_the_model_missing():
    cov = compute_coverage("m", 4, servers(4, (A, 0, 2, "ONLINE", "a")), [node(A, 0, 2)], {}, 100.0)
    assert (cov.expected_blocks, cov.discovered_blocks, cov.loaded_blocks) == (4, 2, 2)
    assert not cov.swarm_ready
    assert cov.missing_blocks == [2, 3] and cov.loading_blocks == []
    assert cov.blocking == ["blocks 2-3: no server announced"]
    assert cov.blocks[0].loaded == [A] and cov.blocks[3].discovered == []


def test_ready_and_joining_is_discovered_not_loaded():
    block_servers = servers(4, (A, 0, 2, "ONLINE", "a"), (B, 2, 4, "ONLINE", "b"), (C, 1, 3, "JOINING", "c"))
    cov = compute_coverage("m", 4, block_servers, [node(A, 0, 2), node(B, 2, 4), node(C, 1, 3)], {C: 95.0}, 100.0)
    assert cov.swarm_ready and cov.blocking == []
    assert cov.blocks[1].discovered == sorted([A, C]) and cov.blocks[1].loaded == [A]

    cov = compute_coverage("m", 4, servers(4, (A, 0, 2, "ONLINE", "a"), (C, 2, 4, "JOINING", "c")),
                           [node(A, 0, 2), node(C, 2, 4)], {C: 95.0}, 100.0)
    assert not cov.swarm_ready
    assert cov.missing_blocks == [] and cov.loading_blocks == [2, 3]
    assert (cov.discovered_blocks, cov.loaded_blocks) == (4, 2)
    assert cov.blocking == ["blocks 2-3: announced but not loaded yet (1 server JOINING)"]


def test_offline_announcement_is_missing():
    cov = compute_coverage("m", 4, servers(4, (A, 0, 2, "ONLINE", "a"), (B, 2, 4, "OFFLINE", "b")),
                           [node(A, 0, 2)], {}, 0.0)
    assert cov.missing_blocks == [2, 3] and "blocks 2-3: no server announced" in cov.blocking


def test_unregistered_peer_earns_nothing():
    cov = compute_coverage("m", 4, servers(4, (A, 0, 2, "ONLINE", "a"), (B, 2, 4, "ONLINE", "b")),
                           [node(A, 0, 2)], {}, 0.0)
    assert cov.swarm_ready
    assert cov.blocking == [f'peer "b" ({B}) serves blocks 2-3 but is not registered: it earns nothing']
    # a node that unregistered (offline) but still serves
    # (a registered peer is paid for work it does even after unregistering: the text must not say "earns nothing")
    cov = compute_coverage("m", 4, servers(4, (A, 0, 4, "ONLINE", None)), [node(A, 0, 4, state="offline")], {}, 0)
    assert cov.blocking == [f"peer {A} serves blocks 0-3 but its node unregistered (state offline): it is not listed "
                            "as active; its work is still paid to the wallet it registered"]
    cov = compute_coverage("m", 4, servers(4, (A, 0, 4, "ONLINE", None)), [node(A, 0, 4, state="unregistered")],
                           {}, 0)
    assert "earns nothing" not in cov.blocking[0] and "still paid" in cov.blocking[0]


def test_registered_but_absent_from_dht():
    cov = compute_coverage("m", 4, servers(4, (A, 0, 2, "ONLINE", "a")),
                           [node(A, 0, 2), node(B, 2, 4, public_name="b")], {}, 0.0)
    assert cov.blocking[0] == "blocks 2-3: no server announced"
    assert cov.blocking[1].startswith(f'node "b" ({B}) is registered for blocks 2-3 but absent from the DHT')
    assert "port/address" in cov.blocking[1]
    # not live (no heartbeat) or offline: not reported as absent
    cov = compute_coverage("m", 4, servers(4, (A, 0, 2, "ONLINE", "a")),
                           [node(A, 0, 2), node(B, 2, 4, live=False), node(C, 2, 4, state="offline")], {}, 0.0)
    assert cov.blocking == ["blocks 2-3: no server announced"]


def test_serving_but_silent_node():
    cov = compute_coverage("m", 2, servers(2, (A, 0, 2, "ONLINE", "a")),
                           [node(A, 0, 2, live=False, last_seen=10.0)], {}, 200.0, heartbeat_ttl_s=90)
    assert cov.swarm_ready
    assert cov.blocking == [f'node "a" ({A}) serves blocks 0-1 but sent no heartbeat for 190 s (limit 90 s): '
                            "it is not active"]


def test_joining_too_long():
    block_servers = servers(4, (A, 0, 4, "ONLINE", "a"), (B, 2, 4, "JOINING", "b"))
    cov = compute_coverage("m", 4, block_servers, [node(A, 0, 4), node(B, 2, 4)], {B: 0.0}, 400.0,
                           joining_too_long_s=300)
    assert cov.swarm_ready  # A serves everything
    assert len(cov.blocking) == 1
    assert cov.blocking[0].startswith(f'server "b" ({B}) has been JOINING blocks 2-3 for 400 s (more than 300 s)')
    cov = compute_coverage("m", 4, block_servers, [node(A, 0, 4), node(B, 2, 4)], {B: 200.0}, 400.0,
                           joining_too_long_s=300)
    assert cov.blocking == []


def test_joining_since_tracking():
    since: dict = {}
    update_joining_since(since, servers(2, (A, 0, 2, "JOINING", None)), 10.0)
    update_joining_since(since, servers(2, (A, 0, 2, "JOINING", None), (B, 0, 1, "JOINING", None)), 20.0)
    assert since == {A: 10.0, B: 20.0}
    update_joining_since(since, servers(2, (A, 0, 2, "ONLINE", None), (B, 0, 1, "JOINING", None)), 30.0)
    assert since == {B: 20.0}


def test_dht_not_read():
    cov = compute_coverage("m", 3, None, [node(A, 0, 3)], {}, 0.0, dht_error="FAR_MESH_DHT_BOOTSTRAP is not set")
    assert not cov.swarm_ready and not cov.dht_connected
    assert cov.missing_blocks == [0, 1, 2]
    assert cov.blocking == ["discovery cannot read the DHT: FAR_MESH_DHT_BOOTSTRAP is not set"]
    assert cov.to_dict()["blocks"][0] == {"block": 0, "discovered": [], "loaded": []}


from hypothesis import given, settings, strategies as st  # noqa: E402

_STATES = st.sampled_from(["JOINING", "ONLINE", "OFFLINE"])


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=12).flatmap(
    lambda n: st.tuples(st.just(n), st.lists(st.tuples(st.sampled_from([A, B, C]), st.integers(0, n - 1),
                                                       st.integers(1, n), _STATES), max_size=6))))
def test_coverage_invariants(case):
    num_blocks, spans = case
    announced = [(peer, start, max(end, start + 1), state, None) for peer, start, end, state in spans]
    cov = compute_coverage("m", num_blocks, servers(num_blocks + 1, *announced)[:num_blocks], [], {}, 0.0)
    loaded = [b.block for b in cov.blocks if b.loaded]
    # every block is exactly one of missing / loading / loaded
    assert sorted(cov.missing_blocks + cov.loading_blocks + loaded) == list(range(num_blocks))
    assert cov.discovered_blocks == num_blocks - len(cov.missing_blocks)
    assert cov.loaded_blocks == len(loaded)
    assert cov.swarm_ready == (not cov.missing_blocks and not cov.loading_blocks)
    assert all(set(b.loaded) <= set(b.discovered) for b in cov.blocks)
    if cov.missing_blocks:
        assert cov.blocking[0] == f"{describe_blocks(cov.missing_blocks)}: no server announced"


def test_reachability_probes_new_peers_first_then_the_oldest_verdicts():
    from services.discovery.reachability import HINT, Reachability, ReachabilityProber

    prober = ReachabilityProber(interval_s=60, max_per_round=2)
    prober.results = {"old": Reachability(True, 100.0, addresses=["/ip4/10.0.0.5/tcp/31330"]),
                      "fresh": Reachability(False, 150.0, "no answer within 5 s")}
    assert prober.due({"new", "old", "fresh"}, now=170.0) == ["new", "old"]  # fresh was checked 20 s ago
    assert prober.due({"old", "fresh"}, now=215.0) == ["old", "fresh"]
    assert prober.get("old") == {"reachable": True, "checked_at": 100.0, "error": None, "hint": None,
                                 "addresses": ["/ip4/10.0.0.5/tcp/31330"], "via_relay": None}
    assert prober.get("fresh")["hint"] == HINT and "--public-address" in HINT
    assert prober.get("never") is None

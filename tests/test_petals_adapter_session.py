"""The engine's seam to Petals (services/common/petals_adapter/session.py), on real Petals objects without a swarm:
the hooks set with ``observe`` are what the (fixed) ``InferenceSession.step`` calls, ``route`` reads the session's
servers, and the quarantine / failure-listener helpers change the client as the coordinator relies on."""

from __future__ import annotations

import threading
import types

import pytest

from services.common import petals_adapter

torch = pytest.importorskip("torch")


def _span(name: bytes, start: int, end: int):
    from hivemind import PeerID
    from petals.data_structures import RemoteSpanInfo, ServerInfo, ServerState

    info = ServerInfo(state=ServerState.ONLINE, throughput=1.0, start_block=start, end_block=end)
    return RemoteSpanInfo(PeerID(name), start, end, info)


class AddsOne:
    """A server session that already holds its cache: returns its inputs + 1."""

    def __init__(self, span):
        self.span, self.stepped, self.history = span, False, None

    def step(self, inputs, prompts, hypo_ids, step_id):
        self.stepped = True
        return inputs + 1

    def __exit__(self, *exc):
        pass


class Manager:
    """The parts of a ``RemoteSequenceManager`` a step without failures touches."""

    def __init__(self, num_blocks: int):
        self.num_blocks, self.successes = num_blocks, []

    def __len__(self):
        return self.num_blocks

    def on_request_success(self, peer_id):
        self.successes.append(peer_id)


def _session(spans):
    from petals.client.inference_session import InferenceSession

    manager = Manager(spans[-1].end)
    session = InferenceSession(manager, max_length=16)
    session._server_sessions = [AddsOne(span) for span in spans]
    return session, manager


def test_route_lists_the_sessions_servers_in_block_order():
    first, second = _span(b"peer-a", 0, 2), _span(b"peer-b", 2, 4)
    session, _ = _session([first, second])
    hops = petals_adapter.route(session)
    assert hops == [petals_adapter.RouteSpan(first.peer_id.to_base58(), 0, 2),
                    petals_adapter.RouteSpan(second.peer_id.to_base58(), 2, 4)]
    assert [hop.blocks for hop in hops] == ["0:2", "2:4"]
    session._server_sessions = []
    assert petals_adapter.route(session) == []


def test_observe_hooks_are_called_by_every_server_step():
    spans = [_span(b"peer-a", 0, 2), _span(b"peer-b", 2, 4)]
    session, manager = _session(spans)
    steps, outputs, failovers = [], [], []
    petals_adapter.observe(session, on_step=lambda span, positions: steps.append((span.peer_id, positions)),
                           on_failover=failovers.append,
                           on_span_output=lambda server_session, out: outputs.append((server_session.span, out)),
                           avoid=set())
    with torch.inference_mode():
        result = session.step(torch.zeros(1, 3, 8))  # a prefill of 3 positions
        assert torch.equal(result, torch.full((1, 3, 8), 2.0))
        session.step(torch.zeros(1, 1, 8))  # then one token
    peers = [span.peer_id for span in spans]
    assert steps == [(peers[0], 3), (peers[1], 3), (peers[0], 1), (peers[1], 1)]
    assert [span for span, _ in outputs] == spans * 2
    assert torch.equal(outputs[1][1], torch.full((1, 3, 8), 2.0))  # what the second server returned
    assert manager.successes == peers * 2 and failovers == []
    assert session.position == 4

    petals_adapter.observe(session)  # replaced: no hooks any more
    session.step(torch.zeros(1, 1, 8))
    assert len(steps) == 4


def test_listen_request_failures_runs_before_petals_and_block_unblock_peer():
    from hivemind import PeerID

    calls = []
    manager = types.SimpleNamespace(
        lock_changes=threading.Lock(), blocked_servers=None,
        on_request_failure=lambda peer: calls.append(("petals failure", peer)),
        on_request_success=lambda peer: calls.append(("petals success", peer)),
        update=lambda wait: calls.append(("update", wait)))
    petals_adapter.listen_request_failures(manager, lambda peer: calls.append(("listener", peer)))
    peer = PeerID(b"suspect-peer-id")

    petals_adapter.block_peer(manager, peer.to_base58())
    assert manager.blocked_servers == {peer}
    assert calls == [("listener", peer), ("petals failure", peer)]  # banned now, and our listeners saw it

    calls.clear()
    petals_adapter.unblock_peer(manager, peer.to_base58())
    assert manager.blocked_servers == set()
    assert calls == [("petals success", peer), ("update", False)]  # ban cleared, routes refreshed at once

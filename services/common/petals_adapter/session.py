"""Our hooks on a Petals inference session and the few reads/writes of Petals' client state the coordinator needs.

The engine (services/coordinator/engine.py) calls these instead of setting attributes on Petals objects or reading
their private fields; nothing else of ours touches ``InferenceSession._server_sessions``,
``RemoteSequenceManager.blocked_servers`` or ``on_request_failure``.

``observe(session, on_step=, on_failover=, on_span_output=, avoid=)`` sets the hooks the session's step calls
(failover.py's step; hooks, not fixes):

- ``on_step(span: RemoteSpanInfo, positions: int)`` after every successful server step, including replays. The
  coordinator meters provider work with it (``WorkMeter.observe_span``, services/coordinator/metering.py).
- ``on_failover(event: dict)`` for every server that failed a step: ``peer_id``, ``blocks`` ("2:4"), ``cause``
  (``failure_cause``: died, hung, refused or distrusted), ``error``, ``replaced_by`` (the peer that then served
  those blocks, or None) and ``stall_s`` (from the start of the failed attempt to the end of the step that
  replaced it).
- ``on_span_output(server_session, outputs)`` after every successful server step: ``server_session.history``
  holds that span's inputs for every position so far (the current ones last), ``server_session.span`` its
  server, and ``outputs`` what the server returned for the positions it was sent. The coordinator's spot checks
  (services/coordinator/verification.py) sample it. It must be cheap: it runs on the stream's path.
- ``avoid``: peer IDs (base58; anything with ``in`` and truth value): a server session on one of them is dropped
  before its next step, like a failed server (cause ``distrusted``): it is banned and its blocks are replayed on
  another server, when another live server holds them (otherwise the session keeps it). A failed spot check adds
  the suspect here, so the rest of that stream avoids it.

``route(session)``: the session's current servers as ``RouteSpan`` (peer_id, start, end).

``open_session(manager, max_length)``: a new ``InferenceSession`` of that client, not bound to a ``with`` block
(the coordinator may park it open after a generation and continue it in the next one: services/coordinator/
prefix_reuse.py); ``session.close()`` ends it. ``position(session)``: the positions it has processed.

``block_peer(manager, peer_id)`` / ``unblock_peer(manager, peer_id)``: keep a server out of (put it back into)
every route of one client (Petals' ``blocked_servers``, a reported failure / a cleared ban and a route refresh).
``listen_request_failures(manager, listener)``: ``listener(peer_id)`` is called for every failed server request
of that client, before Petals bans the server.

This module imports no petals at import time (the package applies its fixes first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

StepObserver = Callable[[Any, int], None]  # (span: RemoteSpanInfo, positions)
FailoverObserver = Callable[[dict], None]
SpanOutputObserver = Callable[[Any, Any], None]  # (server_session: _ServerInferenceSession, outputs: Tensor)

_HOOKS_ATTR = "_far_mesh_hooks"


@dataclass(frozen=True)
class SessionHooks:
    on_step: Optional[StepObserver] = None
    on_failover: Optional[FailoverObserver] = None
    on_span_output: Optional[SpanOutputObserver] = None
    avoid: Any = None  # a container of base58 peer IDs (``in``, truth value), or None


_NO_HOOKS = SessionHooks()


def observe(session, *, on_step: Optional[StepObserver] = None, on_failover: Optional[FailoverObserver] = None,
            on_span_output: Optional[SpanOutputObserver] = None, avoid: Any = None) -> None:
    """Set the hooks of an ``InferenceSession`` (replacing any set before); they apply from its next step."""
    setattr(session, _HOOKS_ATTR, SessionHooks(on_step, on_failover, on_span_output, avoid))


def hooks_of(session) -> SessionHooks:
    """The hooks set by ``observe`` (none set: all None)."""
    return getattr(session, _HOOKS_ATTR, _NO_HOOKS)


@dataclass(frozen=True)
class RouteSpan:
    """One server of a session's route: it serves blocks [start, end)."""

    peer_id: str  # base58
    start: int
    end: int

    @property
    def blocks(self) -> str:
        return f"{self.start}:{self.end}"


def route(session) -> list[RouteSpan]:
    """The servers of an ``InferenceSession`` now, in block order (empty before its first step)."""
    return [RouteSpan(s.span.peer_id.to_base58(), s.span.start, s.span.end) for s in list(session._server_sessions)]


def open_session(manager, max_length: int):
    """A new Petals ``InferenceSession`` over ``manager``'s blocks; the servers allocate cache for ``max_length``
    positions when it first steps. Use it with ``model.use_session(session)``; close it with ``session.close()``."""
    from petals.client.inference_session import InferenceSession

    return InferenceSession(manager, max_length=max_length)


def position(session) -> int:
    """The positions an ``InferenceSession`` has processed (its servers hold their attention cache)."""
    return session.position


def listen_request_failures(manager, listener: Callable[[Any], None]) -> None:
    """Call ``listener(peer_id)`` (a hivemind ``PeerID``, or None) for every failed server request of the client
    ``manager`` (a ``RemoteSequenceManager``), before Petals' own handling (the ban)."""
    upstream_on_failure = manager.on_request_failure

    def on_request_failure(peer_id):
        listener(peer_id)
        upstream_on_failure(peer_id)

    manager.on_request_failure = on_request_failure


def block_peer(manager, peer_id: str) -> None:
    """Stop routing through ``peer_id`` (base58): Petals' ``blocked_servers`` keeps it out of every route refresh,
    and a reported failure (a ban; request-failure listeners see it) drops it from the current routes at once."""
    from hivemind import PeerID

    peer = PeerID.from_base58(peer_id)
    with manager.lock_changes:
        if manager.blocked_servers is None:
            manager.blocked_servers = set()
        manager.blocked_servers.add(peer)
    manager.on_request_failure(peer)


def unblock_peer(manager, peer_id: str) -> None:
    """Route through ``peer_id`` again: out of ``blocked_servers``, its ban cleared, and a route refresh started
    so it is back in the routes at once."""
    from hivemind import PeerID

    peer = PeerID.from_base58(peer_id)
    with manager.lock_changes:
        if manager.blocked_servers is not None:
            manager.blocked_servers.discard(peer)
    manager.on_request_success(peer)
    manager.update(wait=False)

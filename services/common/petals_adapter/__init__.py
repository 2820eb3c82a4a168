"""The one place where Far Mesh adapts Petals (PyPI petals 2.2.0.post1 on hivemind 1.1.12 / torch 2.13).

Import this package before ``petals`` anywhere: importing it applies the fixes (``apply()``, idempotent).
Every entry of ``FIXES`` has a test in tests/test_petals_adapter.py that fails when it is removed
(``FAR_MESH_DISABLE_COMPAT_FIX=<name>[,<name>...]`` turns entries off, for those tests).

What is where:

``fixes.py``
    Upstream bugs and the environment, each with its why: ``hivemind_reexports``, ``grad_scaler_location``,
    ``no_upnp``, ``hf_no_telemetry``, ``no_version_check``, ``quiet_session_del``,
    ``task_cancel_from_any_thread``, ``root_logger_untouched``, ``dead_peer_stream``.
``failover.py``
    Our failover behaviour on the client: ``fast_route_repair``, ``failover_replay``, ``step_latency_budget``
    (``StepLatency``, ``configure_step_budget``), ``lean_client_step`` (a hop's request without re-serializing its
    empty placeholders), ``SwarmUnavailable``, ``PeerDistrusted``, ``failure_cause``,
    ``no_live_server``, ``has_alternative``.
``session.py``
    Our hooks on an inference session and the client state the coordinator reads or changes, as a small API:
    ``observe`` (metering, failover reports, spot checks, peers to avoid), ``route``, ``block_peer`` /
    ``unblock_peer`` (quarantine), ``listen_request_failures``, ``open_session`` / ``position`` (sessions the
    coordinator parks for prefix reuse). The engine (services/coordinator/engine.py)
    touches Petals only through these.
"""

from __future__ import annotations

import logging
import threading
import warnings

from services.common.features import feature_enabled
from services.common.petals_adapter import failover, fixes
from services.common.petals_adapter.failover import (
    DEFAULT_STEP_BUDGET_FACTOR,
    DEFAULT_STEP_BUDGET_FLOOR_S,
    STEP_LATENCY,
    STEP_SAMPLES_PER_PEER,
    PeerDistrusted,
    StepDeadlineExceeded,
    StepLatency,
    SwarmUnavailable,
    configure_step_budget,
    failure_cause,
    has_alternative,
    no_live_server,
)
from services.common.petals_adapter.fixes import ServerStreamClosed
from services.common.petals_adapter.session import (
    RouteSpan,
    SessionHooks,
    block_peer,
    listen_request_failures,
    observe,
    open_session,
    position,
    route,
    unblock_peer,
)

__all__ = [
    "FIXES", "apply",
    "DEFAULT_STEP_BUDGET_FACTOR", "DEFAULT_STEP_BUDGET_FLOOR_S", "STEP_LATENCY", "STEP_SAMPLES_PER_PEER",
    "PeerDistrusted", "ServerStreamClosed", "StepDeadlineExceeded", "StepLatency", "SwarmUnavailable",
    "configure_step_budget", "failure_cause", "has_alternative", "no_live_server",
    "RouteSpan", "SessionHooks", "block_peer", "listen_request_failures", "observe", "open_session", "position", "route",
    "unblock_peer",
]

FIXES = (
    "hivemind_reexports",
    "grad_scaler_location",
    "no_upnp",
    "hf_no_telemetry",
    "no_version_check",
    "quiet_session_del",
    "task_cancel_from_any_thread",
    "root_logger_untouched",
    "fast_route_repair",
    "failover_replay",
    "dead_peer_stream",
    "step_latency_budget",
    "lean_client_step",
)

_applied = False
_lock = threading.Lock()


_PRE_PETALS = {
    "hf_no_telemetry": fixes._fix_hf_no_telemetry,
    "grad_scaler_location": fixes._fix_grad_scaler_location,
    "hivemind_reexports": fixes._fix_hivemind_reexports,
    "no_upnp": fixes._fix_no_upnp,
}
_POST_PETALS = {
    "no_version_check": fixes._fix_no_version_check,
    "quiet_session_del": fixes._fix_quiet_session_del,
    "task_cancel_from_any_thread": fixes._fix_task_cancel_from_any_thread,
    "root_logger_untouched": fixes._fix_root_logger_untouched,
    "fast_route_repair": failover._fix_fast_route_repair,
    "failover_replay": failover._fix_failover_replay,
    "dead_peer_stream": fixes._fix_dead_peer_stream,
    "lean_client_step": failover._fix_lean_client_step,
}


def apply() -> None:
    """Apply every enabled fix once (idempotent, thread-safe)."""
    global _applied
    with _lock:
        if _applied:
            return
        # Known, harmless warnings of the pinned set (not fixes): transformers 4.34 on torch 2.13, and petals
        # loading block weights into meta-initialized modules.
        warnings.filterwarnings("ignore", message=r".*_register_pytree_node.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*copying from a non-meta parameter.*", category=UserWarning)
        for name, fix in _PRE_PETALS.items():
            if feature_enabled(name):
                fix()
        fixes.ROOT_LOGGER_LEVEL = logging.getLogger().level  # before petals' import changes it
        import petals  # noqa: F401  (only after the pre-import fixes)

        for name, fix in _POST_PETALS.items():
            if feature_enabled(name):
                fix()
        failover.patch_server_sessions(report_refusals=feature_enabled("fast_route_repair"),
                                       step_budget=feature_enabled("step_latency_budget"),
                                       closed_stream_error=feature_enabled("dead_peer_stream"))
        _applied = True


apply()

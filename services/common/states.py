"""The state words of the tables, in one place. Each enum mirrors a CHECK constraint of database/migrations
(tests/test_states.py compares them with the migrated schema), and being ``StrEnum``s they go into SQL
parameters and JSON as the plain words."""

from __future__ import annotations

from enum import StrEnum


class SessionStatus(StrEnum):
    """far_mesh_sessions.status: a session is RUNNING until finalize_session() records one of the others."""

    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # its coordinator died or stalled; settled by the stale-session sweep


class ServedBy(StrEnum):
    """far_mesh_sessions.served_by: who generated the answer."""

    SWARM = "swarm"
    FALLBACK = "fallback"  # the upstream API of FALLBACK_ENDPOINTS, while the swarm was not ready: no contributions


class BatchState(StrEnum):
    """far_payment_batches.state. Legal changes: services/payouts/executor.py TRANSITIONS (and the database
    trigger far_payment_batches_guard)."""

    PLANNED = "planned"
    SIGNED = "signed"
    SUBMITTED = "submitted"
    CONFIRMED = "confirmed"
    FAILED = "failed"


OPEN_BATCH_STATES = (BatchState.PLANNED, BatchState.SIGNED, BatchState.SUBMITTED)


class NodeState(StrEnum):
    """far_nodes.state: ONLINE while registered (liveness is the heartbeat's age, not this column)."""

    ONLINE = "online"
    OFFLINE = "offline"
    UNREGISTERED = "unregistered"  # seen on the route by the coordinator, never registered through discovery


class DepositState(StrEnum):
    """far_deposits.state: CREDITED to an account, or UNMATCHED (no account has that deposit reference)."""

    CREDITED = "credited"
    UNMATCHED = "unmatched"

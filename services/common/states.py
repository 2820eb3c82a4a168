"""The state words of the tables, in one place. Each enum mirrors a CHECK constraint of database/migrations
(tests/test_states.py compares them with the migrated schema), and being ``StrEnum``s they go into SQL
parameters and JSON as the plain words."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal


class SessionStatus(StrEnum):
    """far_mesh_sessions.status: a session is RUNNING until finalize_session() records one of the others."""

    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # its coordinator died or stalled; settled by the stale-session sweep


class FinishReason(StrEnum):
    """far_mesh_sessions.finish_reason: why a generation stopped (NULL for a failed session)."""

    LENGTH = "length"  # max_tokens reached
    STOP = "stop"  # a stop sequence, or the fallback API's own stop
    EOS = "eos"  # the model's end-of-sequence token
    CANCELLED = "cancelled"  # the client cancelled or went away


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


class SpotCheckOutcome(StrEnum):
    """far_spot_checks.outcome (docs/verification.md): PASSED (the checked server agrees with the verifier), FAILED
    (a referee agrees with the verifier, not with the checked server), VERIFIER_FAILED (the referee agrees with the
    checked server, not with the verifier), INCONCLUSIVE (they disagree and no referee settled it)."""

    PASSED = "passed"
    FAILED = "failed"
    VERIFIER_FAILED = "verifier_failed"
    INCONCLUSIVE = "inconclusive"


def wire_literal(enum: type[StrEnum]):
    """``Literal["a", "b", ...]`` of the enum's words, for wire models: their schema lists the words themselves."""
    return Literal[tuple(member.value for member in enum)]

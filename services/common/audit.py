"""The audit framework of ``far-mesh audit``: a named check with its problems and notes, the report of all checks,
and the block chunks event logs are read in. The payout checks (services/payouts/audit.py) and the deposit checks
(services/deposits/audit.py) are written on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

# Blocks per eth_getLogs call: nodes cap the range of one call.
LOG_CHUNK = 5_000
# Problems listed per check; more are counted in one line, so a broken table does not flood the report.
PROBLEMS_SHOWN = 50


@dataclass
class Check:
    name: str
    ok: bool
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        """Record a problem: the check is no longer ok."""
        self.ok = False
        if len(self.problems) < PROBLEMS_SHOWN:
            self.problems.append(message)
        elif len(self.problems) == PROBLEMS_SHOWN:
            self.problems.append("… more problems not shown")


@dataclass
class AuditReport:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)


def block_chunks(start: int, latest: int) -> Iterator[tuple[int, int]]:
    """(first, last) block of each log query covering ``start..latest``, inclusive."""
    for first in range(start, latest + 1, LOG_CHUNK):
        yield first, min(first + LOG_CHUNK - 1, latest)

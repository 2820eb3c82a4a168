"""Prometheus metrics of the deposit watcher (all prefixed ``farmesh_deposits_``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

RUNS = Counter("farmesh_deposits_runs_total", "Deposit watcher runs, by result (ok, skipped, reorg, error)", ["result"])
CREDITED = Counter("farmesh_deposits_credited_total", "Deposits credited to accounts")
CREDITED_FAR = Counter("farmesh_deposits_credited_far_total", "FAR credited (float view of exact amounts)")
UNMATCHED = Counter("farmesh_deposits_unmatched_total", "Final deposits whose accountRef names no account")
LAST_BLOCK = Gauge("farmesh_deposits_last_block", "Last block fully processed by the deposit watcher")

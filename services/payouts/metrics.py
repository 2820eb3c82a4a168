"""Prometheus metrics of the payment tracker (all prefixed ``farmesh_payouts_``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RUNS = Counter("farmesh_payouts_runs_total", "Payout runs, by result", ["result"])
LAST_RUN = Gauge("farmesh_payouts_last_run_timestamp_seconds", "Unix time the last payout run ended")
LAST_SUCCESS = Gauge("farmesh_payouts_last_success_timestamp_seconds", "Unix time of the last run without errors")
RUN_DURATION = Histogram("farmesh_payouts_run_duration_seconds", "Duration of a payout run",
                         buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600))
PAID_FAR = Counter("farmesh_payouts_paid_far_total", "FAR paid in confirmed batches (float view of exact amounts)")
PAID_RECIPIENTS = Counter("farmesh_payouts_recipients_paid_total", "Recipient payments in confirmed batches")
BATCHES = Counter("farmesh_payouts_batches_total", "Batches that reached a final state", ["state"])
FAILURES = Counter("farmesh_payouts_failures_total", "Failures: reverted/failed batches and runs that raised",
                   ["kind"])
LAST_RUN_PAID_FAR = Gauge("farmesh_payouts_last_run_paid_far", "FAR paid by the last run")
CARRIED_OVER_FAR = Gauge("farmesh_payouts_carried_over_far", "FAR below the minimum, carried over at the last run")
OPEN_BATCHES = Gauge("farmesh_payouts_open_batches", "Batches planned/signed/submitted after the last run")
GAS_USED = Counter("farmesh_payouts_gas_used_total", "Gas used by confirmed payBatch transactions")

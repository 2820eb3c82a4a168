"""Prometheus metrics of the coordinator (vLLM-style names with a ``farmesh_`` prefix)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                   80.0)

TIME_TO_FIRST_TOKEN = Histogram("farmesh_time_to_first_token_seconds", "Time to first token", ["model_id"],
                                buckets=LATENCY_BUCKETS)
INTER_TOKEN_LATENCY = Histogram("farmesh_inter_token_latency_seconds", "Time between two tokens of a stream",
                                ["model_id"], buckets=LATENCY_BUCKETS)
E2E_LATENCY = Histogram("farmesh_e2e_request_latency_seconds", "End-to-end request latency", ["model_id"],
                        buckets=LATENCY_BUCKETS)
GENERATED_TOKENS = Counter("farmesh_generation_tokens_total", "Generated tokens", ["model_id"])
PROMPT_TOKENS = Counter("farmesh_prompt_tokens_total", "Prompt tokens prefilled", ["model_id"])
REQUESTS = Counter("farmesh_requests_total", "Requests by outcome", ["model_id", "outcome"])
FAILOVERS = Counter("farmesh_failovers_total", "Servers that failed a step of a running session, by cause "
                    "(died: connection/stream lost; hung: no answer within its step budget or the request timeout; "
                    "refused: answered with an error) and whether a replica took over", ["model_id", "cause",
                                                                                          "recovered"])
FAILOVER_STALL = Histogram("farmesh_failover_stall_seconds", "From the start of a failed server step to the end of "
                           "the replica's step that replaced it", ["model_id", "cause"], buckets=LATENCY_BUCKETS)
NODE_WORK_UNITS = Counter("farmesh_node_work_units_total", "Work units (blocks x positions) per provider peer",
                          ["peer_id"])
RUNNING = Gauge("farmesh_num_requests_running", "Generations running now", ["model_id"])
WAITING = Gauge("farmesh_num_requests_waiting", "Generations waiting for a running slot (admission queue)",
                ["model_id"])
SWARM_READY = Gauge("farmesh_swarm_ready", "1 if every block of the model has an ONLINE server", ["model_id"])
FALLBACK_REQUESTS = Counter("farmesh_fallback_requests_total", "Requests served by the fallback API while the swarm "
                            "was not ready, by outcome (completed, cancelled, fallback_error, fallback_timeout, "
                            "generation_timeout)", ["model_id", "outcome"])
SPOT_CHECKS = Counter("farmesh_spot_checks_total", "Spot checks of server steps by outcome (passed, failed, "
                      "verifier_failed, inconclusive)", ["model_id", "outcome"])
SPOT_CHECKS_DROPPED = Counter("farmesh_spot_checks_dropped_total", "Sampled steps not checked because the "
                              "check queue was full (a check never slows a stream)", ["model_id"])
SPOT_CHECKS_PENDING = Gauge("farmesh_spot_checks_pending", "Sampled steps waiting for or in a check", ["model_id"])
QUARANTINED = Gauge("farmesh_quarantined_peers", "Peers quarantined after repeated failed spot checks")

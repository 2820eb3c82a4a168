"""Prometheus metrics of the discovery service (one registry per app instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class DiscoveryMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.nodes_online = Gauge("far_discovery_nodes_online", "Registered nodes with a live heartbeat", registry=r)
        self.nodes_registered = Gauge("far_discovery_nodes_registered", "Nodes registered (state online)",
                                      registry=r)
        self.heartbeats = Counter("far_discovery_heartbeats", "Heartbeats received", ["result"], registry=r)
        self.registrations = Counter("far_discovery_registrations", "Registration attempts", ["result"], registry=r)
        self.flushes = Counter("far_discovery_heartbeat_flushes", "Write-behind flushes to Postgres", registry=r)
        self.flushed_rows = Counter("far_discovery_heartbeat_flushed_rows", "Heartbeats written to Postgres",
                                    registry=r)
        self.flush_seconds = Histogram("far_discovery_heartbeat_flush_seconds", "Duration of one flush",
                                       registry=r)
        self.expected_blocks = Gauge("far_discovery_model_expected_blocks", "Blocks of the model", ["model_id"],
                                     registry=r)
        self.discovered_blocks = Gauge("far_discovery_model_discovered_blocks",
                                       "Blocks announced by a JOINING or ONLINE server", ["model_id"], registry=r)
        self.loaded_blocks = Gauge("far_discovery_model_loaded_blocks", "Blocks with an ONLINE server",
                                   ["model_id"], registry=r)
        self.swarm_ready = Gauge("far_discovery_swarm_ready", "1 when every block has an ONLINE server",
                                 ["model_id"], registry=r)
        self.dht_errors = Counter("far_discovery_dht_read_errors", "Failed DHT reads", ["model_id"], registry=r)
        self.dht_age = Gauge("far_discovery_dht_observed_timestamp_seconds", "When the DHT was last read",
                             ["model_id"], registry=r)
        self.unreachable_peers = Gauge("far_discovery_unreachable_peers", "Servers announced in the DHT that "
                                       "discovery cannot dial (clients cannot reach them)", ["model_id"], registry=r)

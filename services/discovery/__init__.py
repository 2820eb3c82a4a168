"""The discovery service: node registry, liveness, swarm coverage (see docs/discovery.md)."""

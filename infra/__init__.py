"""Infrastructure helpers: embedded PostgreSQL / Redis for the demo and tests (see docs/embedded.md)."""

from infra.embedded import (
    EmbeddedError,
    PostgresHandle,
    RedisHandle,
    embedded_status,
    ensure_postgres,
    ensure_redis,
    stop_embedded,
)

__all__ = [
    "EmbeddedError",
    "PostgresHandle",
    "RedisHandle",
    "embedded_status",
    "ensure_postgres",
    "ensure_redis",
    "stop_embedded",
]

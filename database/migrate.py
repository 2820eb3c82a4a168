"""Apply the SQL migrations in ``database/migrations`` (yoyo-migrations, psycopg 3).

Files are applied in name order (``0001_initial.sql``, ``0002_...``), each in its own transaction, and
recorded in yoyo's ``_yoyo_migration`` table, so running :func:`migrate` again applies nothing.

Two processes migrating at once are safe: each first takes a PostgreSQL advisory lock (released by the
server if the process dies, so a crash never leaves a stale lock), then yoyo's own lock row, and only then
computes what is pending.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_ADVISORY_LOCK_KEY = int.from_bytes(hashlib.sha256(b"far-mesh:migrations").digest()[:8], "big", signed=True)


def libpq_url(url: str) -> str:
    """``postgresql+psycopg://``, ``postgres://``, ``postgresql+asyncpg://`` ... -> ``postgresql://`` (libpq/asyncpg)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme.startswith("postgres"):
        return urlunsplit(("postgresql", *parts[1:]))
    raise ValueError(f"not a PostgreSQL URL: {url!r}")


def yoyo_url(url: str) -> str:
    """Any PostgreSQL URL -> the ``postgresql+psycopg://`` form yoyo needs for psycopg 3."""
    return urlunsplit(("postgresql+psycopg", *urlsplit(libpq_url(url))[1:]))


def with_database(url: str, database: str) -> str:
    """``url`` naming another database on the same server."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


def create_database(server_url: str, name: str, *, replace: bool = False) -> str:
    """Create database ``name`` on the server of ``server_url`` (dropping an old one first with ``replace``);
    returns its URL. Used by the demo, the test fixtures and the benchmarks for databases of their own."""
    with psycopg.connect(libpq_url(server_url), autocommit=True) as conn:
        if replace:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return with_database(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    with psycopg.connect(libpq_url(server_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, *parts[2:]))


@contextlib.contextmanager
def _advisory_lock(url: str, timeout_s: float):
    with psycopg.connect(libpq_url(url), autocommit=True, connect_timeout=10) as conn:
        conn.execute(f"SET lock_timeout = '{int(timeout_s * 1000)}ms'")
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (_ADVISORY_LOCK_KEY,))
        except psycopg.errors.LockNotAvailable:
            raise TimeoutError(f"another process has been migrating {redact(url)} for more than {timeout_s:.0f} s") from None
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_ADVISORY_LOCK_KEY,))


def _read_migrations():
    from yoyo import read_migrations

    return read_migrations(str(MIGRATIONS_DIR))


def migrate(postgres_url: str, *, lock_timeout_s: float = 120.0) -> list[str]:
    """Apply every pending migration; return the ids applied now (``[]`` when up to date)."""
    from yoyo import get_backend

    migrations = _read_migrations()
    with _advisory_lock(postgres_url, lock_timeout_s):
        backend = get_backend(yoyo_url(postgres_url))
        try:
            with backend.lock(timeout=lock_timeout_s):
                pending = backend.to_apply(migrations)
                backend.apply_migrations(pending)
            return [migration.id for migration in pending]
        finally:
            backend.connection.close()


@dataclass(frozen=True)
class MigrationStatus:
    id: str
    applied: bool


def status(postgres_url: str) -> list[MigrationStatus]:
    """Every migration file, in order, with whether it is applied."""
    from yoyo import get_backend

    migrations = _read_migrations()
    backend = get_backend(yoyo_url(postgres_url))
    try:
        applied = set(backend.get_applied_migration_hashes())
        return [MigrationStatus(m.id, m.hash in applied) for m in migrations]
    finally:
        backend.connection.close()


def break_lock(postgres_url: str) -> None:
    """Remove yoyo's lock row (only needed if a migrating process was killed; see docs/database.md)."""
    from yoyo import get_backend

    with _advisory_lock(postgres_url, 30):
        backend = get_backend(yoyo_url(postgres_url))
        try:
            backend.break_lock()
        finally:
            backend.connection.close()

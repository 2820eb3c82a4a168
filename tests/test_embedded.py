"""Embedded PostgreSQL / Redis (infra.embedded) started for real on a temporary state dir."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest
import redis

from infra.embedded import (
    child_pids,
    embedded_status,
    ensure_postgres,
    ensure_redis,
    pid_alive,
    stop_embedded,
)

UNREACHABLE_PG = "postgresql://postgres@127.0.0.1:1/none"
UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def state_dir():
    # Not pytest's tmp_path: it is mode 0700 under /tmp/pytest-of-root, which the unprivileged PostgreSQL
    # user (we run as root here) cannot traverse.
    path = Path(tempfile.mkdtemp(prefix="far-mesh-embedded-test-"))
    path.chmod(0o755)
    yield path
    stop_embedded(path)  # in case an assertion failed midway
    shutil.rmtree(path, ignore_errors=True)


def test_embedded_postgres_start_query_stop_restart(state_dir):
    with ensure_postgres(UNREACHABLE_PG, state_dir) as pg:
        assert pg.embedded and pg.owned and pg.url.startswith("postgresql://postgres@127.0.0.1:")
        with psycopg.connect(pg.url, autocommit=True) as conn:
            assert conn.execute("SELECT current_database()").fetchone()[0] == "farmesh"
            assert conn.execute("SELECT inet_server_addr()::text").fetchone()[0] == "127.0.0.1/32"
            conn.execute("CREATE TABLE kept (v text)")
            conn.execute("INSERT INTO kept VALUES ('survives restart')")
        # a second caller attaches to the running server instead of starting another one
        attached = ensure_postgres(None, state_dir)
        assert attached.url == pg.url and attached.pid == pg.pid and not attached.owned
        attached.stop()  # not its server: no-op
        assert pid_alive(pg.pid)
        pids = [pg.pid, *child_pids(pg.pid)]
        assert len(pids) > 1  # postmaster + its background processes
    assert not any(pid_alive(pid) for pid in pids)

    with ensure_postgres(UNREACHABLE_PG, state_dir) as again:  # same data dir: data reused
        assert again.pid not in pids
        with psycopg.connect(again.url) as conn:
            assert conn.execute("SELECT v FROM kept").fetchone()[0] == "survives restart"
        pid = again.pid
    assert not pid_alive(pid)


def test_embedded_redis_start_ping_stop_restart(state_dir):
    with ensure_redis(UNREACHABLE_REDIS, state_dir) as rd:
        assert rd.embedded and rd.url.startswith("redis://127.0.0.1:")
        client = redis.Redis.from_url(rd.url)
        assert client.ping()
        client.set("far-mesh:test", "kept")
        client.close()
        pid = rd.pid
        assert ensure_redis(None, state_dir).pid == pid  # attaches
    assert not pid_alive(pid)

    with ensure_redis(None, state_dir) as again:
        client = redis.Redis.from_url(again.url)
        assert client.get("far-mesh:test") == b"kept"
        client.close()
        pid = again.pid
    assert not pid_alive(pid)


def test_reachable_urls_are_used_as_is(postgres_server_url, redis_url, state_dir):
    with ensure_postgres(postgres_server_url, state_dir) as pg, ensure_redis(redis_url, state_dir) as rd:
        assert (pg.url, pg.embedded, rd.url, rd.embedded) == (postgres_server_url, False, redis_url, False)
    assert not (state_dir / "postgres").exists() and not (state_dir / "redis").exists()


def test_cli_up_status_down(state_dir):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "infra.embedded", *args, "--state-dir", str(state_dir),
                               "--postgres-url", UNREACHABLE_PG, "--redis-url", UNREACHABLE_REDIS],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    up = run("up")
    assert up.returncode == 0, up.stderr
    status = embedded_status(state_dir)
    assert f"export POSTGRES_URL={status['postgres']}" in up.stdout
    assert up.stdout.splitlines() == [f"export POSTGRES_URL={status['postgres']}",
                                      f"export REDIS_URL={status['redis']}"]  # logs go to stderr
    assert "starting embedded PostgreSQL on 127.0.0.1:" in up.stderr
    with psycopg.connect(status["postgres"]) as conn:  # still running after the CLI exited
        assert conn.execute("SELECT 1").fetchone()[0] == 1
    assert run("status").returncode == 0
    down = run("down")
    assert down.returncode == 0 and "PostgreSQL" in down.stdout and "Redis" in down.stdout
    assert embedded_status(state_dir) == {"postgres": None, "redis": None}
    assert run("status").returncode == 3

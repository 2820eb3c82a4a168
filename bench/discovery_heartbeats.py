"""Heartbeat throughput of the discovery service over loopback.

Starts ``far-mesh discovery`` as a subprocess on a fresh, migrated Postgres database and an empty Redis logical
database (both dropped/flushed at the end), seeds N registered nodes (rows in ``far_nodes`` + node tokens, the
same state ``POST /nodes/register`` leaves; RSA proofs for 10,000 nodes would only benchmark key generation),
then drives ``POST /nodes/heartbeat`` from many simulated nodes over keep-alive HTTP/1.1 connections:

1. saturation: a closed loop with ``--connections`` connections for ``--duration`` s -> the sustained rate;
2. paced: an open loop at ``--rate`` heartbeats/s for ``--duration`` s -> p50/p99/max latency at that rate
   (measured from each request's *scheduled* send time, so queueing behind a stall is counted).

It checks that the write-behind reached Postgres (``last_seen`` of every beaten node moved) and prints the
flush statistics. Usage::

    .venv/bin/python bench/discovery_heartbeats.py --nodes 10000 --rate 2000 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import base58  # noqa: E402
import httpx  # noqa: E402

from infra.embedded import free_port  # noqa: E402
from infra.processes import ManagedProcess, wait_until  # noqa: E402


def fake_peer_id() -> str:
    return base58.b58encode(bytes([0x12, 0x20]) + secrets.token_bytes(32)).decode()


class Connection:
    """A minimal keep-alive HTTP/1.1 client: enough for a fixed request shape, and cheap on CPU."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, token: str, body: bytes) -> tuple[int, bytes]:
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        payload = await self.reader.readexactly(length) if length else b""
        return status, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def seed(postgres_url: str, redis_url: str, nodes: int, model_id: str) -> list[tuple[str, str]]:
    import asyncpg

    from services.discovery.hot import HotStore, new_token, token_hash

    tokens = [new_token() for _ in range(nodes)]
    conn = await asyncpg.connect(postgres_url)
    try:
        rows = await conn.fetch(
            """INSERT INTO far_nodes (peer_id, wallet_address, model_id, start_block, end_block, public_name,
                                      node_token_hash, last_seen)
               SELECT p, '0x' || lpad(to_hex(i), 40, '0'), $3, 0, 2, 'bench-' || i, h, now() - interval '1 hour'
                 FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(p, h, i)
               RETURNING node_id::text, node_token_hash""",
            [fake_peer_id() for _ in range(nodes)], [token_hash(t) for t in tokens], model_id)
    finally:
        await conn.close()
    by_hash = {r["node_token_hash"]: r["node_id"] for r in rows}
    hot = HotStore.from_url(redis_url, heartbeat_ttl_s=90)
    try:
        async with hot.redis.pipeline(transaction=False) as pipe:
            for token in tokens:
                sha = token_hash(token)
                pipe.set(f"fm:disc:tok:{sha}", by_hash[sha])
                # registration also caches the node's ledger figures (tokens served, FAR earned)
                pipe.hset(f"fm:disc:node:{by_hash[sha]}", "ledger", '{"tokens_served": 0, "earned_far": "0"}')
            await pipe.execute()
    finally:
        await hot.close()
    return [(by_hash[token_hash(t)], t) for t in tokens]


def body_for(i: int) -> bytes:
    return json.dumps({"tokens_served": i, "vram_used_gb": 1.5, "gpu_temp_c": 55, "state": "online"}).encode()


async def saturate(port: int, tokens: list[str], connections: int, duration: float) -> dict:
    conns = [Connection("127.0.0.1", port) for _ in range(connections)]
    await asyncio.gather(*(c.open() for c in conns))
    latencies: list[float] = []
    errors = 0
    counter = 0
    stop_at = time.perf_counter() + duration

    async def worker(conn: Connection) -> None:
        nonlocal errors, counter
        while time.perf_counter() < stop_at:
            i = counter
            counter += 1
            started = time.perf_counter()
            status, _ = await conn.post("/nodes/heartbeat", tokens[i % len(tokens)], body_for(i))
            latencies.append(time.perf_counter() - started)
            if status != 200:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.perf_counter() - started
    for c in conns:
        c.close()
    return {"mode": f"saturation ({connections} connections)", "requests": len(latencies), "errors": errors,
            "elapsed_s": elapsed, "rate": len(latencies) / elapsed, **_lat(latencies)}


async def paced(port: int, tokens: list[str], connections: int, rate: float, duration: float) -> dict:
    """Open loop: connection k sends request j at begin + (j * connections + k) / rate; latency is measured from
    that scheduled time (a late send counts as latency)."""
    conns = [Connection("127.0.0.1", port) for _ in range(connections)]
    await asyncio.gather(*(c.open() for c in conns))
    latencies: list[float] = []
    errors = 0
    per_conn = int(rate * duration / connections)
    begin = time.perf_counter() + 0.1

    async def worker(k: int, conn: Connection) -> None:
        nonlocal errors
        for j in range(per_conn):
            i = j * connections + k
            scheduled = begin + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            status, _ = await conn.post("/nodes/heartbeat", tokens[i % len(tokens)], body_for(i))
            latencies.append(time.perf_counter() - scheduled)
            if status != 200:
                errors += 1

    await asyncio.gather(*(worker(k, c) for k, c in enumerate(conns)))
    elapsed = time.perf_counter() - begin
    for c in conns:
        c.close()
    return {"mode": f"paced at {rate:.0f}/s ({connections} connections)", "requests": len(latencies),
            "errors": errors, "elapsed_s": elapsed, "rate": len(latencies) / elapsed, **_lat(latencies)}


def _lat(latencies: list[float]) -> dict:
    ms = [x * 1000 for x in latencies]
    return {"p50_ms": percentile(ms, 0.50), "p99_ms": percentile(ms, 0.99), "max_ms": max(ms) if ms else 0,
            "mean_ms": statistics.fmean(ms) if ms else 0}


def report(result: dict) -> None:
    print(f"{result['mode']:<40} {result['requests']:>7} req in {result['elapsed_s']:5.1f} s = "
          f"{result['rate']:7.0f} heartbeats/s | p50 {result['p50_ms']:6.2f} ms | p99 {result['p99_ms']:6.2f} ms | "
          f"max {result['max_ms']:7.2f} ms | errors {result['errors']}", flush=True)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


async def main_async(args) -> int:
    import asyncpg
    import redis

    from database.migrate import create_database, drop_database, migrate

    name = f"farmesh_bench_{secrets.token_hex(4)}"
    server_url = args.postgres_url
    postgres_url = create_database(server_url, name)
    redis_db = None
    for db in range(15, 0, -1):
        client = redis.Redis.from_url(f"{args.redis_url.rsplit('/', 1)[0]}/{db}")
        if client.dbsize() == 0 and client.set("__far_mesh_bench_claim__", "1", nx=True, ex=3600):
            redis_db = db
            client.close()
            break
        client.close()
    if redis_db is None:
        raise SystemExit("no empty Redis logical database to use")
    redis_url = f"{args.redis_url.rsplit('/', 1)[0]}/{redis_db}"
    workdir = Path(args.workdir)
    process = None
    try:
        migrate(postgres_url)
        model_id = "bench/model"
        nodes = await seed(postgres_url, redis_url, args.nodes, model_id)
        tokens = [t for _, t in nodes]
        port = free_port()
        env = dict(os.environ, POSTGRES_URL=postgres_url, REDIS_URL=redis_url, FAR_MESH_DHT_BOOTSTRAP="",
                   FAR_MESH_MODEL_PATH="", DISCOVERY_MODELS=f"{model_id}=32", LOG_LEVEL="WARNING",
                   DISCOVERY_FLUSH_INTERVAL_S=str(args.flush_interval))
        process = ManagedProcess("discovery", [sys.executable, "-m", "services.cli", "discovery", "--port", str(port)],
                                 env=env, log_path=workdir / "discovery-bench.log").start()
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=60, what="discovery /readyz", process=process)
        print(f"discovery pid {process.pid} on {url}; {args.nodes} nodes seeded; flush every "
              f"{args.flush_interval} s; {os.cpu_count()} CPUs", flush=True)
        started_at = time.time()
        await paced(port, tokens, args.connections, min(args.rate, 500), 2)  # warm-up (also warms the ledgers)
        gc.collect()
        gc.disable()  # the measuring client must not add its own GC pauses to the latencies
        results = [await saturate(port, tokens, args.connections, args.duration)]
        report(results[-1])
        results.append(await paced(port, tokens, args.connections, args.rate, args.duration))
        report(results[-1])
        gc.enable()
        conn = await asyncpg.connect(postgres_url)
        try:  # the write-behind reaches Postgres within a flush interval or two
            deadline = time.monotonic() + min(args.flush_interval * 2 + 5, 60)
            while True:
                updated = await conn.fetchval("SELECT count(*) FROM far_nodes WHERE last_seen >= to_timestamp($1)",
                                              started_at)
                if updated >= args.nodes or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            active = await conn.fetchval("SELECT count(*) FROM active_far_nodes")
        finally:
            await conn.close()
        metrics = httpx.get(f"{url}/metrics").text
        flushes = metric(metrics, "far_discovery_heartbeat_flushes_total")
        rows = metric(metrics, "far_discovery_heartbeat_flushed_rows_total")
        flush_sum = metric(metrics, "far_discovery_heartbeat_flush_seconds_sum")
        beats = metric(metrics, 'far_discovery_heartbeats_total')
        print(f"heartbeats received {beats:.0f}; Postgres: {flushes:.0f} flushes wrote {rows:.0f} rows "
              f"(mean flush {1000 * flush_sum / max(flushes, 1):.0f} ms); nodes with fresh last_seen: {updated}/"
              f"{args.nodes}; active_far_nodes: {active}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"results": results, "flushes": flushes, "flushed_rows": rows,
                                                   "fresh_last_seen": updated}, indent=2))
        ok = all(r["errors"] == 0 for r in results) and updated == args.nodes
        return 0 if ok else 1
    finally:
        if process is not None:
            process.stop()
        client = redis.Redis.from_url(redis_url)
        client.flushdb()
        client.close()
        drop_database(server_url, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=2000, help="paced phase: heartbeats per second")
    parser.add_argument("--duration", type=float, default=20, help="seconds per phase")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--flush-interval", type=float, default=5.0)
    parser.add_argument("--postgres-url", default=os.environ.get("TEST_POSTGRES_URL",
                                                                 "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--redis-url", default=os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--workdir", default="/tmp/far-mesh-bench")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    raise SystemExit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()

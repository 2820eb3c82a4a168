"""Coordinator benchmarks, each against a baseline measured in the same run.

    .venv/bin/python bench/coordinator_bench.py [--tokens 64] [--repeats 5] [--concurrency 16]

1. SSE tokens/s through the coordinator ÷ tokens/s of the raw Petals client (``model.generate``) on the same
   2-server swarm (0:2, 2:4).
2. ``--concurrency`` simultaneous streams: aggregate tokens/s ÷ one stream's tokens/s, and p50/p95 time to
   first token.
3. Stall after a provider is killed: two replicas serve 2:4; the replica on the route is SIGKILLed mid-stream;
   reports the longest gap between two tokens around the kill vs the median gap.
Needs PostgreSQL and Redis (POSTGRES_URL / REDIS_URL, else embedded ones are started). Everything it starts
is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from bench.sse import stream_generation  # noqa: E402
from infra.swarm import LocalSwarm  # noqa: E402
from services.coordinator.accounts import provision_api_key  # noqa: E402
from tests.fixtures.swarm import MODEL_ID, start_coordinator  # noqa: E402

PROMPT = "def compute(a, b):"


def stream(url: str, key: str, tokens: int, on_token=None) -> dict:
    return stream_generation(url, key, PROMPT, tokens, on_token)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    from database.migrate import create_database, drop_database, migrate
    from infra.embedded import ensure_postgres, ensure_redis
    from services.common.config import get_settings
    from services.common.tiny_model import build_tiny_model
    from services.coordinator.engine import SwarmModel

    settings = get_settings()
    with tempfile.TemporaryDirectory(prefix="far-mesh-bench-") as tmp:
        tmp = Path(tmp)
        tmp.chmod(0o755)
        with ensure_postgres(settings.POSTGRES_URL, tmp / "state") as pg, ensure_redis(settings.REDIS_URL,
                                                                                        tmp / "state") as redis:
            db_url = create_database(pg.url, f"farmesh_bench_{os.getpid()}", replace=True)
            migrate(db_url)
            _, key = asyncio.run(provision_api_key(db_url, name="bench", balance_far=Decimal("100000"),
                                                   rate_limit_per_minute=100000))
            model_dir = build_tiny_model(tmp / "model")
            with LocalSwarm(model_dir, MODEL_ID, tmp / "swarm", request_timeout=30) as swarm:
                swarm.start_bootstrap()
                swarm.start_node("a", "0:2")
                swarm.start_node("b", "2:4")
                swarm.wait_online(["a", "b"], 4)
                coordinator = start_coordinator(workdir=tmp / "coordinator", model_dir=model_dir,
                                                initial_peers=swarm.initial_peers, postgres_url=db_url,
                                                redis_url=redis.url, api_key=key)
                try:
                    client = SwarmModel(MODEL_ID, model_dir, swarm.initial_peers)
                    import torch

                    inputs = torch.tensor([client.encode(PROMPT)])

                    def raw() -> float:
                        start = time.perf_counter()
                        with torch.inference_mode():
                            client.model.generate(inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                                  do_sample=False)
                        return args.tokens / (time.perf_counter() - start)

                    raw()
                    stream(coordinator.url, key, args.tokens)  # warm-up
                    raw_rates, sse_rates = [], []
                    for _ in range(args.repeats):  # interleaved, so load changes hit both alike
                        raw_rates.append(raw())
                        result = stream(coordinator.url, key, args.tokens)
                        sse_rates.append(result["tokens"] / result["elapsed"])
                    client.shutdown()

                    single = stream(coordinator.url, key, args.tokens)
                    single_rate = single["tokens"] / single["elapsed"]
                    results = []
                    threads = [threading.Thread(target=lambda: results.append(stream(coordinator.url, key,
                                                                                     args.tokens)))
                               for _ in range(args.concurrency)]
                    start = time.perf_counter()
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                    wall = time.perf_counter() - start
                    aggregate = sum(r["tokens"] for r in results) / wall
                    ttfts = sorted(r["ttft"] for r in results)

                    # 3. stall after a provider is killed
                    swarm.start_node("c", "2:4")
                    swarm.wait_online(["a", "b", "c"], 4)
                    time.sleep(2 * 2.0)  # the coordinator's routing table sees c
                    killed = {}

                    def on_token(index, event):
                        if index == args.tokens // 3 and not killed:
                            route = httpx.get(f"{coordinator.url}/mesh/inference/{event['request_id']}",
                                              headers=coordinator.headers).json()["route"]
                            victim = next(n for n in ("b", "c") if swarm.nodes[n].peer_id in
                                          {hop["peer_id"] for hop in route})
                            killed["at"] = time.perf_counter()
                            killed["name"] = victim
                            os.killpg(swarm.nodes[victim].process.pid, signal.SIGKILL)  # no waiting here

                    failover = stream(coordinator.url, key, args.tokens, on_token)
                    gaps = [b - a for a, b in zip(failover["stamps"], failover["stamps"][1:])]
                    after = [b for b in failover["stamps"] if b > killed["at"]]
                    stall = after[0] - killed["at"]  # the kill itself happens between two tokens
                    around = max(gaps[max(0, args.tokens // 3 - 2):args.tokens // 3 + 3])
                finally:
                    coordinator.process.stop()
            drop_database(pg.url, f"farmesh_bench_{os.getpid()}")

    sse, base = statistics.median(sse_rates), statistics.median(raw_rates)
    print(f"tiny Llama, {args.tokens} greedy tokens, 2 servers on loopback, median of {args.repeats}")
    print(f"  raw Petals client      {base:7.1f} tok/s  ({', '.join(f'{r:.0f}' for r in raw_rates)})")
    print(f"  coordinator SSE        {sse:7.1f} tok/s  ({', '.join(f'{r:.0f}' for r in sse_rates)})")
    print(f"  ratio SSE / raw        {sse / base:7.3f}")
    print(f"{args.concurrency} concurrent streams: aggregate {aggregate:.1f} tok/s vs one stream {single_rate:.1f} "
          f"tok/s -> {aggregate / single_rate:.2f}x; TTFT p50 {statistics.median(ttfts) * 1000:.0f} ms, "
          f"p95 {ttfts[int(0.95 * (len(ttfts) - 1))] * 1000:.0f} ms")
    print(f"provider killed mid-stream: next token {stall * 1000:.0f} ms after the SIGKILL; longest gap around the "
          f"kill {around * 1000:.0f} ms vs median inter-token gap {statistics.median(gaps) * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

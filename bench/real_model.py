"""The default real model (SmolLM2-135M-Instruct, 30 blocks) through a 3-server swarm, each figure against a
baseline measured in the same run.

    .venv/bin/python bench/real_model.py [--tokens 32] [--repeats 5]

1. Launch -> ready: seconds from starting the DHT bootstrap and three servers (0:10, 10:20, 20:30) until every
   block has an ONLINE server in the DHT (what `far-mesh status` calls "Swarm Ready: YES"), and from starting
   the coordinator until its /readyz answers 200.
2. Greedy tokens/s (``--tokens``, median of ``--repeats``, runs interleaved so load changes hit every path
   alike): local transformers ``generate`` (the same checkpoint, 1 and 2 torch threads; the faster one is the
   baseline — on this 2-core box 1 thread is ~3x faster than 2), the raw Petals client
   ``model.generate`` through the swarm, and the coordinator's SSE stream. Ratios swarm/local and SSE/raw.
3. Memory of each server's process tree and of the coordinator: PSS (shared pages split between the processes
   that map them, so forked handler processes are not counted twice) and, for comparison, the plain RSS sum.
Needs PostgreSQL and Redis (POSTGRES_URL / REDIS_URL, else embedded ones). Everything it starts is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


from bench.sse import stream_generation  # noqa: E402
from infra.swarm import LocalSwarm  # noqa: E402
from services.coordinator.accounts import provision_api_key  # noqa: E402
from tests.fixtures.swarm import start_coordinator  # noqa: E402

PROMPT = "The three most important inventions of the nineteenth century were"
SPANS = {"a": "0:10", "b": "10:20", "c": "20:30"}


def sse_rate(url: str, key: str, tokens: int) -> float:
    run = stream_generation(url, key, PROMPT, tokens)
    assert run["tokens"] == tokens, f"the stream ended after {run['tokens']} tokens"
    return run["tokens"] / run["elapsed"]


def tree_memory_mib(pid: int) -> tuple[float, float]:
    """(PSS, RSS) of a process and all its children, in MiB."""
    import psutil

    root = psutil.Process(pid)
    pss = rss = 0
    for process in (root, *root.children(recursive=True)):
        try:
            info = process.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        pss, rss = pss + info.pss, rss + info.rss
    return pss / 2**20, rss / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from services.common import petals_adapter  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM

    from database.migrate import create_database, drop_database, migrate
    from infra.embedded import ensure_postgres, ensure_redis
    from services.common.config import get_settings
    from services.coordinator.engine import SwarmModel
    from services.models.catalog import SMOLLM2, pull

    settings = get_settings()
    model_dir = pull(SMOLLM2)
    db_name = f"farmesh_bench_{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="far-mesh-bench-") as tmp:
        tmp = Path(tmp)
        tmp.chmod(0o755)
        with ensure_postgres(settings.POSTGRES_URL, tmp / "state") as pg, \
                ensure_redis(settings.REDIS_URL, tmp / "state") as redis:
            db_url = create_database(pg.url, db_name, replace=True)
            migrate(db_url)
            _, key = asyncio.run(provision_api_key(db_url, name="bench", balance_far=Decimal("100000"),
                                                   rate_limit_per_minute=100000))
            with LocalSwarm(model_dir, SMOLLM2.model_id, tmp / "swarm") as swarm:
                launched = time.perf_counter()
                swarm.start_bootstrap()
                for name, span in SPANS.items():
                    swarm.start_node(name, span)
                swarm.wait_online(list(SPANS), SMOLLM2.num_blocks, timeout=300)
                swarm_ready_s = time.perf_counter() - launched
                launched = time.perf_counter()
                coordinator = start_coordinator(workdir=tmp / "coordinator", model_dir=model_dir,
                                                initial_peers=swarm.initial_peers, postgres_url=db_url,
                                                redis_url=redis.url, api_key=key, model_id=SMOLLM2.model_id)
                coordinator_ready_s = time.perf_counter() - launched
                client = None
                try:
                    local = AutoModelForCausalLM.from_pretrained(model_dir).eval()
                    client = SwarmModel(SMOLLM2.model_id, model_dir, swarm.initial_peers)
                    inputs = torch.tensor([client.encode(PROMPT)])

                    def timed(generate) -> float:
                        start = time.perf_counter()
                        with torch.inference_mode():
                            out = generate(inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                           do_sample=False, pad_token_id=2)
                        return (out.shape[1] - inputs.shape[1]) / (time.perf_counter() - start)

                    def local_with(threads: int) -> float:
                        torch.set_num_threads(threads)
                        try:
                            return timed(local.generate)
                        finally:
                            torch.set_num_threads(1)  # the client's own LM head runs in this process too

                    torch.set_num_threads(1)
                    local_with(1), timed(client.model.generate), sse_rate(coordinator.url, key, args.tokens)
                    local1_rates, local2_rates, raw_rates, sse_rates = [], [], [], []
                    for _ in range(args.repeats):
                        local1_rates.append(local_with(1))
                        local2_rates.append(local_with(2))
                        raw_rates.append(timed(client.model.generate))
                        sse_rates.append(sse_rate(coordinator.url, key, args.tokens))
                    memory = {f"{name} ({SPANS[name]})": tree_memory_mib(node.process.pid)
                              for name, node in swarm.nodes.items()}
                    memory["coordinator"] = tree_memory_mib(coordinator.process.pid)
                finally:
                    if client is not None:
                        client.shutdown()
                    coordinator.process.stop()
            drop_database(pg.url, db_name)

    local1, local2, raw_rate, sse = (statistics.median(r) for r in (local1_rates, local2_rates, raw_rates,
                                                                     sse_rates))
    local_rate = max(local1, local2)

    def runs(rates):
        return ", ".join(f"{r:.2f}" for r in rates)

    print(f"SmolLM2-135M-Instruct (30 blocks, float32), {args.tokens} greedy tokens, median of {args.repeats}; "
          f"servers {', '.join(SPANS.values())} on loopback")
    print(f"  launch -> swarm ready (every block ONLINE)   {swarm_ready_s:6.1f} s")
    print(f"  coordinator launch -> /readyz               {coordinator_ready_s:6.1f} s")
    print(f"  local transformers, 1 thread  {local1:6.2f} tok/s  ({runs(local1_rates)})")
    print(f"  local transformers, 2 threads {local2:6.2f} tok/s  ({runs(local2_rates)})  baseline: the faster")
    print(f"  swarm, raw Petals client      {raw_rate:6.2f} tok/s  ({runs(raw_rates)})")
    print(f"  swarm, coordinator SSE        {sse:6.2f} tok/s  ({runs(sse_rates)})")
    print(f"  ratio swarm (raw) / local     {raw_rate / local_rate:6.3f}")
    print(f"  ratio swarm (SSE) / local     {sse / local_rate:6.3f}")
    print(f"  ratio SSE / raw client        {sse / raw_rate:6.3f}")
    print("  memory per process tree, PSS (RSS sum) MiB: " + ", ".join(
        f"{name} {pss:.0f} ({rss:.0f})" for name, (pss, rss) in memory.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Concurrent streams through a swarm whose servers batch sessions' steps (docs/batching.md), against the same
swarm with batching off, in one run.

    .venv/bin/python bench/concurrency_bench.py [--model tiny|smollm2] [--streams 1,8,16] [--tokens 32]

For each setting (batching on, then off; a fresh swarm each: bootstrap + 3 servers, the toy model's 4 blocks
on 0:2/2:3/3:4, SmolLM2 on 0:10/10:20/20:30), and for each number of
concurrent streams: aggregate greedy tokens/s (all streams' tokens / wall time from the first start to the last
end), p95 time to first token, and each server's average decode batch size over that run (from its status
file). Streams are the coordinator's own client (services/coordinator/engine.py), one thread each, distinct
prompts. CPU: cores kept busy during the streams (CPU seconds / wall seconds) by this process (the client: the
coordinator's engine and its p2pd) and by each server's process tree, from psutil. Output: a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["def compute(a, b):", "import os\nimport sys", "class Parser:", "for i in range(10):",
           "The quick brown fox", "while True:", "return x + y", "# a comment about", "if __name__ ==",
           "with open(path) as f:", "try:\n    pass", "lambda x:", "print('hello')", "from typing import",
           "async def main():", "raise ValueError("]


def p95(values):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]


def cpu_seconds(pid: int, *, exclude: frozenset = frozenset()) -> float:
    """User + system CPU seconds of a process and its live descendants (a server's Petals process, p2pd),
    leaving out the trees rooted at ``exclude`` (the servers and the bootstrap are this process's children)."""
    import psutil

    def tree(proc):
        if proc.pid in exclude:
            return 0.0
        try:
            times = proc.cpu_times()
            return times.user + times.system + sum(tree(child) for child in proc.children())
        except psutil.NoSuchProcess:
            return 0.0

    try:
        return tree(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return 0.0


def run_streams(client, count: int, tokens: int):
    from services.coordinator.metering import WorkMeter
    from services.coordinator.sampling import SamplingParams

    ttft, produced, errors = [], [], []
    barrier = threading.Barrier(count)

    def one(index: int):
        ids = client.encode(PROMPTS[index % len(PROMPTS)])
        barrier.wait()
        start = time.perf_counter()
        n = 0
        try:
            for _delta in client.start(ids, SamplingParams(max_tokens=tokens, temperature=0), WorkMeter()):
                if n == 0:
                    ttft.append(time.perf_counter() - start)
                n += 1
        except Exception as error:  # reported in the table
            errors.append(repr(error))
        produced.append(n)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return sum(produced) / wall, p95(ttft) if ttft else float("nan"), errors


def bench(model_dir: Path, model_id: str, spans: list[str], num_blocks: int, batching: bool, streams: list[int],
          tokens: int, workdir: Path, batch_wait_ms: float, torch_threads: int = 1) -> list[dict]:
    from infra.swarm import LocalSwarm
    from services.coordinator.engine import SwarmModel

    rows = []
    names = [f"s{i}" for i in range(len(spans))]
    with LocalSwarm(model_dir, model_id, workdir) as swarm:
        swarm.start_bootstrap()
        for name, span in zip(names, spans):
            swarm.start_node(name, span, extra_args=(("--batch-wait-ms", str(batch_wait_ms)) if batching
                                                     else ("--no-batching",)) + ("--torch-threads", str(torch_threads)))
        swarm.wait_online(names, num_blocks, timeout=300)
        client = SwarmModel(model_id, model_dir, swarm.initial_peers, request_timeout=60)
        try:
            run_streams(client, 1, 4)  # warm-up
            for count in streams:
                time.sleep(1.2)
                before = {name: swarm.node_status(name).get("batching") or {} for name in names}
                servers = [swarm.nodes[name].process.pid for name in names]
                others = frozenset(servers + [swarm.bootstrap.pid])

                def cpu_now():
                    return [cpu_seconds(os.getpid(), exclude=others)] + [cpu_seconds(pid) for pid in servers]

                cpu_before, wall_before = cpu_now(), time.perf_counter()
                rate, ttft, errors = run_streams(client, count, tokens)
                wall = time.perf_counter() - wall_before
                cores = [(after - before) / wall for after, before in zip(cpu_now(), cpu_before)]
                time.sleep(1.2)  # status files are written every second
                batch = []
                for name in names:
                    after = swarm.node_status(name).get("batching") or {}
                    steps = after.get("decode_steps", 0) - before[name].get("decode_steps", 0)
                    passes = after.get("decode_batches", 0) - before[name].get("decode_batches", 0)
                    batch.append(f"{steps / passes:.2f}" if passes else "1 (off)")
                head = client.logits_batcher
                rows.append(dict(batching=batching, streams=count, rate=rate, ttft=ttft, batch=batch, errors=errors,
                                 cores=f"{cores[0]:.2f} / " + " / ".join(f"{c:.2f}" for c in cores[1:])
                                 + f" (Σ {sum(cores):.2f})",
                                 head_batch=f"{head.rows / head.passes:.2f}" if head.passes else "-"))
                head.rows = head.passes = 0
                print(rows[-1], flush=True)
        finally:
            client.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--streams", default="1,8,16")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batching", choices=("on,off", "on", "off"), default="on,off",
                        help="server batching settings to run (default: both, in one run)")
    parser.add_argument("--batch-wait-ms", type=float, default=50.0, help="far-node run --batch-wait-ms")
    parser.add_argument("--torch-threads", type=int, default=1, help="far-node run --torch-threads (each server)")
    args = parser.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    from services.common import petals_adapter  # noqa: F401
    import torch

    from services.common.config import CoordinatorSettings

    torch.set_num_threads(CoordinatorSettings().TORCH_THREADS)  # the client runs torch as the coordinator does
    workdir = Path(tempfile.mkdtemp(prefix="concurrency-bench-"))
    if args.model == "tiny":
        from services.common.tiny_model import build_tiny_model

        model_dir, model_id = build_tiny_model(workdir / "tiny-llama"), "far-mesh/tiny-llama"
        spans, num_blocks = ["0:2", "2:3", "3:4"], 4
    else:
        from services.models.catalog import SMOLLM2, pull

        model_dir, model_id = pull(SMOLLM2, progress=False), SMOLLM2.model_id
        spans, num_blocks = ["0:10", "10:20", "20:30"], 30
    rows = []
    for batching in [s == "on" for s in args.batching.split(",")]:
        rows += bench(model_dir, model_id, spans, num_blocks, batching, streams, args.tokens,
                      workdir / f"swarm-{'on' if batching else 'off'}", args.batch_wait_ms, args.torch_threads)
    single = {r["batching"]: r["rate"] for r in rows if r["streams"] == 1}

    def ratio(row) -> str:  # against one stream of the same setting, when --streams ran one
        return f"{row['rate'] / single[row['batching']]:.2f}" if row["batching"] in single else "—"

    print(f"\n{args.model}, {args.tokens} greedy tokens per stream, servers {' '.join(spans)}\n")
    print("| batching | streams | aggregate tok/s | x one stream (same setting) | p95 TTFT s | avg batch per server "
          "| avg LM-head batch | CPU cores busy: client / servers |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'on' if r['batching'] else 'off'} | {r['streams']} | {r['rate']:.1f} | "
              f"{ratio(r)} | {r['ttft']:.2f} | {' / '.join(r['batch'])} | "
              f"{r['head_batch']} | {r['cores']} |"
              + (f" errors: {len(r['errors'])}" if r["errors"] else ""))
    if len(single) == 2:
        print(f"\nsingle stream, batching on / off: {single[True] / single[False]:.2f}")


if __name__ == "__main__":
    main()

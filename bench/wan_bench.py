"""One stream's speed under WAN delay, against the physical bound of its route, in the WAN lab (infra/wanlab.py).

    sudo .venv/bin/python bench/wan_bench.py [--model tiny|smollm2] [--delays 0,10,25,50] [--tokens 32]
                                             [--repeats 3] [--routes chain,whole]

For each route shape, a fresh lab and swarm: the bootstrap and each server on a host of its own, the client (the
coordinator's engine, services/coordinator/engine.py, in this process) in the root namespace on the lab's
bridge, undelayed. ``chain``: three servers in a row (toy model 0:2/2:3/3:4, SmolLM2 0:10/10:20/20:30);
``whole``: one server holding every block. Between measurements every server's link gets the one-way delay d
(``WanLab.set_link``, same swarm), so each client <-> server leg takes d.

Per delay: single-stream greedy decode tokens/s (tokens after the first / time from the first to the last) and
TTFT, the median of ``--repeats`` generations; t0 = time per token at d = 0 (same run). Ratios against
``1 / (t0 + (n + 1) d)`` (the least any scheme needs: client -> s1 -> ... -> sn -> client, n + 1 legs) and
``1 / (t0 + 2 n d)`` (client-mediated steps, what Petals' client does: each hop returns to the client).
Needs root and the lab's tools (scripts/ensure_debian_tools.sh). Output: a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "def compute(a, b):"
NODE_PORT, DHT_PORT = 31330, 31337


def one_stream(client, tokens: int) -> tuple[float, float]:
    """(decode tokens/s, TTFT s) of one greedy generation."""
    from services.coordinator.metering import WorkMeter
    from services.coordinator.sampling import SamplingParams

    ids = client.encode(PROMPT)
    start = time.perf_counter()
    first = last = None
    count = 0
    for _delta in client.start(ids, SamplingParams(max_tokens=tokens, temperature=0), WorkMeter()):
        last = time.perf_counter()
        first = first or last
        count += 1
    if count < 2:
        raise RuntimeError(f"the stream produced {count} tokens")
    return (count - 1) / (last - first), first - start


def bench_route(model_dir: Path, model_id: str, spans: list[str], num_blocks: int, delays: list[float],
                tokens: int, repeats: int, workdir: Path) -> list[dict]:
    from infra.swarm import LocalSwarm
    from infra.wanlab import LinkShape, WanLab
    from services.coordinator.engine import SwarmModel

    rows = []
    names = [f"s{i}" for i in range(len(spans))]
    with WanLab() as lab, LocalSwarm(model_dir, model_id, workdir) as swarm:
        dht = lab.add_host("dht")
        hosts = {name: lab.add_host(name) for name in names}
        swarm.start_bootstrap(timeout=180, extra_args=("--host", "0.0.0.0", "--port", str(DHT_PORT), "--announce-maddrs",
                                          dht.address), argv_prefix=tuple(dht.argv([])))
        for name, span in zip(names, spans):
            swarm.start_node(name, span, argv_prefix=tuple(hosts[name].argv([])),
                             extra_args=("--host", "0.0.0.0", "--port", str(NODE_PORT), "--public-address",
                                         hosts[name].address))
        swarm.wait_online(names, num_blocks, timeout=600)
        client = SwarmModel(model_id, model_dir, swarm.initial_peers, request_timeout=60)
        try:
            one_stream(client, 4)  # warm-up: routes, sessions, caches
            for delay in delays:
                for name in names:
                    lab.set_link(hosts[name], LinkShape(delay_ms=delay))
                time.sleep(0.5)
                runs = [one_stream(client, tokens) for _ in range(repeats)]
                rows.append(dict(servers=len(spans), delay=delay, rate=statistics.median(r[0] for r in runs),
                                 ttft=statistics.median(r[1] for r in runs)))
                print(rows[-1], flush=True)
        finally:
            client.shutdown()
    t0 = 1 / next(r["rate"] for r in rows if r["delay"] == 0) if any(r["delay"] == 0 for r in rows) else None
    for row in rows:
        n, d = row["servers"], row["delay"] / 1000
        row["bound"] = 1 / (t0 + (n + 1) * d) if t0 else None
        row["mediated"] = 1 / (t0 + 2 * n * d) if t0 else None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--delays", default="0,10,25,50", help="one-way delays per link, ms (include 0 for t0)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--routes", default="chain,whole")
    args = parser.parse_args()
    from infra.wanlab import unavailable_reason

    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"the WAN lab cannot run here: {reason}")
    from services.common import petals_adapter  # noqa: F401
    import torch

    from services.common.config import CoordinatorSettings

    torch.set_num_threads(CoordinatorSettings().TORCH_THREADS)  # the client runs torch as the coordinator does
    workdir = Path(tempfile.mkdtemp(prefix="wan-bench-"))
    if args.model == "tiny":
        from services.common.tiny_model import build_tiny_model

        model_dir, model_id, num_blocks = build_tiny_model(workdir / "tiny-llama"), "far-mesh/tiny-llama", 4
        shapes = {"chain": ["0:2", "2:3", "3:4"], "whole": ["0:4"]}
    else:
        from services.models.catalog import SMOLLM2, pull

        model_dir, model_id, num_blocks = pull(SMOLLM2, progress=False), SMOLLM2.model_id, 30
        shapes = {"chain": ["0:10", "10:20", "20:30"], "whole": ["0:30"]}
    delays = [float(d) for d in args.delays.split(",")]
    rows = []
    for route in args.routes.split(","):
        rows += [dict(row, route=route) for row in bench_route(model_dir, model_id, shapes[route], num_blocks,
                                                                 delays, args.tokens, args.repeats,
                                                                 workdir / f"swarm-{route}")]
    print(f"\n{args.model}, one greedy stream of {args.tokens} tokens, median of {args.repeats}, client undelayed, "
          "one-way delay d on every server's link\n")
    print("| route | servers | d ms | decode tok/s | TTFT s | bound 1/(t0+(n+1)d) | x bound "
          "| client-mediated bound 1/(t0+2nd) | x that |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['route']} | {r['servers']} | {r['delay']:g} | {r['rate']:.2f} | {r['ttft']:.3f} | "
              f"{r['bound']:.2f} | {r['rate'] / r['bound']:.2f} | {r['mediated']:.2f} | "
              f"{r['rate'] / r['mediated']:.2f} |")


if __name__ == "__main__":
    main()

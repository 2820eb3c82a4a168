"""Failover stall when a server on the route dies (or freezes) at a random moment (issue 14).

    .venv/bin/python bench/failover_bench.py [--model tiny|smollm2] [--kills 20] [--tokens 64] [--freeze] [--seed 1]

A local swarm on loopback: for the tiny model one 0:2 server and two 2:4 replicas ("a", "b*"); for SmolLM2-135M
(the default real model, 30 blocks) one 0:15 server and two 15:30 replicas. Each round generates ``--tokens``
greedy tokens with the coordinator's engine (the Petals client with petals_adapter, request timeout 30 s as the
coordinator's default) and, after a random token, SIGKILLs the 2:4 server on the route (its whole process group,
p2pd included) after a further random delay of 0-40 ms, so the kill lands at a random point of a step or between
steps. The killed server is replaced by a fresh one (new peer ID) before the next round. With ``--freeze`` the
server is SIGSTOPped instead (a hung host) and SIGCONTed after the round.

Reports per round the stall (from the kill to the next token) and the gap the user saw (the two tokens around
the kill), then the median and the max over all rounds, next to the median gap between tokens without
failure. Every round's output is checked against the local model (token-identical).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from infra.swarm import LocalSwarm  # noqa: E402
from tests.fixtures.swarm import MODEL_ID, NUM_BLOCKS, local_greedy  # noqa: E402

MODELS = {  # model -> (prompt, first span, replicated span)
    "tiny": ("def compute(a, b):", "0:2", "2:4"),
    "smollm2": ("The three most important inventions of the nineteenth century were", "0:15", "15:30"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--freeze", action="store_true", help="SIGSTOP instead of SIGKILL")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    from services.coordinator.engine import SwarmModel
    from services.coordinator.metering import WorkMeter
    from services.coordinator.sampling import SamplingParams
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="far-mesh-failover-") as tmp:
        tmp = Path(tmp)
        prompt, first_span, replicated = MODELS[args.model]
        if args.model == "tiny":
            from services.common.tiny_model import build_tiny_model

            model_dir, model_id, num_blocks = build_tiny_model(tmp / "model"), MODEL_ID, NUM_BLOCKS
        else:
            from services.models.catalog import SMOLLM2, pull

            model_dir, model_id, num_blocks = pull(SMOLLM2), SMOLLM2.model_id, SMOLLM2.num_blocks
        local = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        with LocalSwarm(model_dir, model_id, tmp / "swarm", request_timeout=30) as swarm:
            swarm.start_bootstrap()
            swarm.start_node("a", first_span)
            replicas = [swarm.start_node("b0", replicated), swarm.start_node("b1", replicated)]
            swarm.wait_online(["a", "b0", "b1"], num_blocks, timeout=300)
            client = SwarmModel(model_id, model_dir, swarm.initial_peers, request_timeout=30, update_period=2)
            if args.freeze:
                client.sequence_manager.state.banned_peers.base_time = 2.0  # thawed servers return quickly
            prompt_ids = client.encode(prompt)
            expected = local_greedy(local, prompt_ids, args.tokens)
            # The engine stops at an end-of-generation token; the local reference is cut there too.
            cut = next((i + 1 for i, t in enumerate(expected) if t in client.eos_token_ids), len(expected))
            expected = expected[:cut]
            stalls, gaps_seen, normal_gaps, causes = [], [], [], []
            spawned = 2
            for round_no in range(args.kills):
                generation = client.start(prompt_ids, SamplingParams(max_tokens=args.tokens, temperature=0),
                                          WorkMeter())
                kill_after = rng.randint(3, len(expected) - 8)
                delay = rng.uniform(0.0, 0.040)
                stamps, tokens, hit = [], [], {}

                def strike(node):
                    hit["at"] = time.perf_counter()
                    if args.freeze:
                        os.killpg(node.process.pid, signal.SIGSTOP)
                    else:
                        os.killpg(node.process.pid, signal.SIGKILL)

                for delta in generation:
                    stamps.append(time.perf_counter())
                    tokens.append(delta.token_id)
                    if delta.index == kill_after:
                        route = {h["blocks"]: h["peer_id"] for h in generation.route()}
                        victim = next(n for n in replicas if n.peer_id == route[replicated])
                        threading.Timer(delay, strike, args=(victim,)).start()
                assert tokens == expected, f"round {round_no}: output differs from the local model"
                after = next(i for i, s in enumerate(stamps) if s > hit["at"])
                stall = stamps[after] - hit["at"]
                gap = stamps[after] - stamps[after - 1]
                stalls.append(stall)
                gaps_seen.append(gap)
                normal_gaps.extend(b - a for i, (a, b) in enumerate(zip(stamps, stamps[1:])) if i + 1 != after)
                causes.extend(e["cause"] for e in generation.failovers)
                print(f"round {round_no + 1:2d}: {'freeze' if args.freeze else 'kill'} after token {kill_after} "
                      f"+{delay * 1000:.0f} ms: stall {stall:.3f} s, gap seen {gap:.3f} s, "
                      f"failovers {[(e['cause'], round(e['stall_s'], 3)) for e in generation.failovers]}",
                      flush=True)
                if args.freeze:
                    os.killpg(victim.process.pid, signal.SIGCONT)
                    time.sleep(2.5)  # its ban (2 s) ends; the routing refresh (2 s) brings it back
                else:
                    victim.process.kill()
                    replicas.remove(victim)
                    fresh = swarm.start_node(f"b{spawned}", replicated)
                    spawned += 1
                    replicas.append(fresh)
                    swarm.wait_online([fresh.name], num_blocks, timeout=300)
                    time.sleep(2.5)  # the client's routing refresh (update_period 2 s) sees the new replica
            client.shutdown()

    print(f"\n{args.model}: {args.kills} {'freezes' if args.freeze else 'kills'} at random moments, "
          f"{len(expected)} greedy tokens each, output identical to the local model every time")
    print(f"stall (kill -> next token): median {statistics.median(stalls):.3f} s, max {max(stalls):.3f} s")
    print(f"gap seen by the user:       median {statistics.median(gaps_seen):.3f} s, max {max(gaps_seen):.3f} s")
    print(f"gap between tokens without failure: median {statistics.median(normal_gaps) * 1000:.1f} ms")
    print(f"failover causes: { {c: causes.count(c) for c in sorted(set(causes))} }")
    return 0


if __name__ == "__main__":
    sys.exit(main())

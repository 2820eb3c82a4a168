"""Spot checks: detection vs sampling rate, overhead on tokens/s, false positives.

    .venv/bin/python bench/verification_bench.py [--trials 2000] [--rounds 6] [--tokens 48] [--live-fractions 1,0.1]

1. **Detection, simulated** (the coordinator's real ``SamplingPolicy``: a new server is checked at
   ``SPOT_CHECK_NEW_NODE_RATE`` until it has ``SPOT_CHECK_CLEAN_RECORD`` passed checks, then at the rate): a server
   corrupting a share ``f`` of its steps; how many of its steps until the first failed check (its stream leaves
   it, that session is disputed) and until the second (quarantine), median and p90 over ``--trials``.
2. **Detection, live**: a local swarm (tiny model) with two honest 0:4 servers and one dishonest 0:4 server
   (tests/dishonest_server.py: noise of 5 % of the norm on a share ``f`` of its inference steps; it announces
   itself fast, so it is routed). The coordinator's engine generates with a ``SpotChecker`` at the default rates;
   counts the cheater's steps until its first failed check (no consequences applied, so it keeps serving).
3. **Overhead and false positives**: on an honest swarm (two 0:4 servers), rounds alternate checks off / on at
   the default rate (servers with a clean record: 3 %) / on at rate 1 (every step), in one run; tokens/s per
   setting (median of the rounds; "sampled only": the stream's own cost, the draw and the queueing, with the checks
   never run) and every check's outcome (any failed or inconclusive check of an honest server
   is a false positive), with the largest honest disagreement seen against the float32 tolerance.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from infra.swarm import LocalSwarm  # noqa: E402
from tests.fixtures.swarm import MODEL_ID, NUM_BLOCKS  # noqa: E402

CHEATER = Path(__file__).resolve().parents[1] / "tests" / "dishonest_server.py"
PROMPT = "def compute(a, b):"


def simulate(fraction: float, rate: float, new_rate: float, clean: int, trials: int, seed: int) -> tuple:
    from services.coordinator.verification import SamplingPolicy

    rng = random.Random(seed)
    first, second = [], []
    for _ in range(trials):
        policy = SamplingPolicy(rate=rate, new_node_rate=new_rate, clean_record=clean)
        failures, step = 0, 0
        while failures < 2 and step < 10_000_000:
            step += 1
            corrupt = rng.random() < fraction
            if rng.random() < policy.rate_for("cheater"):
                policy.record("cheater", not corrupt)
                if corrupt:
                    failures += 1
                    (first if failures == 1 else second).append(step)
    q = lambda xs, p: sorted(xs)[int(p * (len(xs) - 1))]  # noqa: E731
    return statistics.median(first), q(first, 0.9), statistics.median(second), q(second, 0.9)


def offer_cost(rate: float, calls: int = 200_000) -> float:
    """Microseconds the stream pays per server step for the sampling (draw + queue put when sampled)."""
    import types

    import torch

    from services.coordinator.verification import SamplingPolicy, SpotChecker

    class Peer:
        def to_base58(self):
            return "QmPeer"

    span = types.SimpleNamespace(peer_id=Peer(), start=0, end=4, server_info=types.SimpleNamespace(torch_dtype="x"))
    session = types.SimpleNamespace(span=span, history=torch.zeros(1, 100, 576))
    outputs = torch.zeros(1, 1, 576)
    checker = SpotChecker("m", None, SamplingPolicy(rate, rate, 0), lambda r: None, max_queue=10**7, seed=1)
    started = time.perf_counter()
    for _ in range(calls):
        checker.offer(session, outputs, session_id=None, avoid=None)
    return (time.perf_counter() - started) / calls * 1e6


def make_checker(swarm_model, rate: float, new_rate: float, clean: int, results: list, seed: int,
                 run: bool = True):
    from services.coordinator.verification import LocalSpanVerifier, SamplingPolicy, SpotChecker, SwarmForward

    forward = SwarmForward(swarm_model.sequence_manager)
    checker = SpotChecker(MODEL_ID, forward, SamplingPolicy(rate, new_rate, clean), results.append,
                          max_queue=100_000, seed=seed,
                          trusted=LocalSpanVerifier(swarm_model.model_path, swarm_model.model.config, 2**30))
    # every server of the bench's swarm registered on a wallet of its own (who may verify: docs/verification.md)
    peers = {peer for peer, _dtype in forward.candidates(0, NUM_BLOCKS, set())}
    checker.registry = {peer: f"wallet-{index}" for index, peer in enumerate(sorted(peers))}
    return checker.start() if run else checker  # not run: sampled steps are queued and never checked


def generate(model, tokens: int, checker=None) -> tuple[int, float]:
    from services.coordinator.metering import WorkMeter
    from services.coordinator.sampling import SamplingParams

    model.spot_checker = checker
    started = time.perf_counter()
    generation = model.start(model.encode(PROMPT), SamplingParams(max_tokens=tokens, temperature=0), WorkMeter())
    count = sum(1 for _ in generation)
    return count, time.perf_counter() - started


def drain(checker, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not checker.idle() and time.monotonic() < deadline:
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=6, help="overhead: rounds per setting")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--live-fractions", default="1,0.1,0.01", help="live detection: corrupted shares ('' = none)")
    parser.add_argument("--live-max-steps", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    from services.common.config import Settings

    defaults = Settings.model_fields
    rate = defaults["SPOT_CHECK_RATE"].default
    new_rate = defaults["SPOT_CHECK_NEW_NODE_RATE"].default
    clean = defaults["SPOT_CHECK_CLEAN_RECORD"].default

    print(f"## detection, simulated ({args.trials} trials; new-server rate {new_rate} until {clean} passed checks)")
    print("corrupted share | rate | steps to 1st failed check: median / p90 | to quarantine (2nd): median / p90")
    for fraction in (1.0, 0.1, 0.01):
        for r in (0.01, 0.03, 0.1):
            m1, p1, m2, p2 = simulate(fraction, r, new_rate, clean, args.trials, args.seed)
            print(f"{fraction:>6.0%} | {r:.0%} | {m1:g} / {p1:g} | {m2:g} / {p2:g}")

    print("\n## on the stream's path: SpotChecker.offer() per server step")
    for r in (0.0, rate, 1.0):
        print(f"rate {r:.0%}: {offer_cost(r):.2f} us")

    from services.common.tiny_model import build_tiny_model
    from services.coordinator.engine import SwarmModel

    with tempfile.TemporaryDirectory(prefix="far-mesh-verify-") as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_model(tmp / "model")
        with LocalSwarm(model_dir, MODEL_ID, tmp / "swarm", request_timeout=30) as swarm:
            swarm.start_bootstrap()
            swarm.start_node("h1", "0:4")
            swarm.start_node("h2", "0:4")
            swarm.wait_online(["h1", "h2"], NUM_BLOCKS)
            model = SwarmModel(MODEL_ID, model_dir, swarm.initial_peers, request_timeout=30)
            try:
                generate(model, 8)  # warm-up: routes, connections
                settings = {"off": None, f"default ({rate:.0%})": (rate, 0.0, 0), "every step": (1.0, 1.0, 0),
                            "sampled only": (rate, 0.0, 0, False)}
                speeds = {name: [] for name in settings}
                results: list = []
                checkers = {name: make_checker(model, *cfg[:3], results, args.seed, run=cfg[3] if len(cfg) > 3
                                               else True) for name, cfg in settings.items() if cfg is not None}
                for _ in range(args.rounds):
                    for name in settings:
                        count, seconds = generate(model, args.tokens, checkers.get(name))
                        speeds[name].append(count / seconds)
                        if name in checkers and name != "sampled only":
                            # a setting's checks finish before the next setting is timed (they used to run on
                            # into the next one: "sampled only", timed after "every step", paid for its checks)
                            drain(checkers[name])
                print(f"\n## overhead (honest swarm, 2 x 0:4 servers, {args.rounds} rounds x {args.tokens} tokens, "
                      "alternating)")
                base = statistics.median(speeds["off"])
                for name, values in speeds.items():
                    med = statistics.median(values)
                    print(f"{name:>14}: {med:6.1f} tokens/s ({(med / base - 1) * 100:+.1f} %)")
                outcomes: dict = {}
                for result in results:
                    outcomes[result.verdict.outcome] = outcomes.get(result.verdict.outcome, 0) + 1
                worst = max((r.verdict.error for r in results), default=0.0)
                false_positives = sum(1 for r in results if r.verdict.outcome != "passed")
                print(f"\n## false positives: {false_positives} of {len(results)} checks {outcomes}; largest honest "
                      f"disagreement {worst:.2e} (float32 tolerance {results[0].tolerance if results else '-'})")
                for checker in checkers.values():
                    checker.stop()
            finally:
                model.shutdown()

            fractions = [float(f) for f in args.live_fractions.split(",") if f.strip()]
            if fractions:
                print("\n## detection, live (dishonest 0:4 server, default rates; its steps until its first failed "
                      "check)")
            for index, fraction in enumerate(fractions):
                name = f"cheater{index}"
                swarm.start_node(name, "0:4", extra_args=(
                    "--server-command", f"{sys.executable} {CHEATER} --mode noise --fraction {fraction} "
                                        f"--seed {args.seed + index}"))
                swarm.wait_online([name], NUM_BLOCKS)
                peer = swarm.nodes[name].peer_id
                model = SwarmModel(MODEL_ID, model_dir, swarm.initial_peers, request_timeout=30)
                results = []
                checker = make_checker(model, rate, new_rate, clean, results, args.seed + index)
                steps = 0
                caught = None
                prompt_len = len(model.encode(PROMPT))
                try:
                    while caught is None and steps < args.live_max_steps:
                        meter_steps = checker.counters["offered"]
                        generate(model, args.tokens, checker)
                        drain(checker)
                        failed = [r for r in results if r.verdict.outcome == "failed" and r.suspect_peer == peer]
                        if failed:  # the step of this generation it was caught at: 1 = the prefill
                            caught = failed[0]
                            steps += caught.job.history.shape[1] - prompt_len + 1
                        else:
                            steps += checker.counters["offered"] - meter_steps
                    others = [r for r in results if r.suspect_peer not in (None, peer)]
                    print(f"corrupting {fraction:.0%}: caught at its step {steps} "
                          f"({checker.counters['sampled']} sampled, {len(results)} checks; honest flagged: "
                          f"{len(others)})" if caught else f"corrupting {fraction:.0%}: not caught in {steps} steps")
                finally:
                    checker.stop()
                    model.shutdown()
                    swarm.nodes[name].process.stop()
                    swarm.wait_gone(name, NUM_BLOCKS)
    return 0


if __name__ == "__main__":
    sys.exit(main())

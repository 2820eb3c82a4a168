"""Tokens/s through a local 2-server Petals swarm vs the same tiny model run locally, in the same run.

    .venv/bin/python bench/swarm_vs_local.py [--tokens 64] [--repeats 7]

Starts a DHT bootstrap and two servers (blocks 0:2, 2:4) on loopback, then times greedy generation of
``--tokens`` tokens: (1) locally with transformers, (2) through the swarm with the raw Petals client
(``model.generate``), (3) through our engine (services.coordinator.engine, the coordinator's path, with
metering). Reports medians over ``--repeats`` runs and the ratios. Everything it starts is stopped.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common import petals_adapter  # noqa: E402,F401

import torch  # noqa: E402

from infra.swarm import LocalSwarm  # noqa: E402
from services.common.tiny_model import build_tiny_model  # noqa: E402

MODEL_ID = "far-mesh/tiny-llama"
PROMPT = "def compute(a, b):"


def median_rate(fn, tokens: int, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        produced = fn()
        rates.append(produced / (time.perf_counter() - start))
    return statistics.median(rates), rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from transformers import AutoModelForCausalLM

    from services.coordinator.engine import SwarmModel
    from services.coordinator.metering import WorkMeter
    from services.coordinator.sampling import SamplingParams

    with tempfile.TemporaryDirectory(prefix="far-mesh-bench-") as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model")
        local = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        with LocalSwarm(model_dir, MODEL_ID, Path(tmp) / "swarm") as swarm:
            swarm.start_bootstrap()
            swarm.start_node("a", "0:2")
            swarm.start_node("b", "2:4")
            swarm.wait_online(["a", "b"], 4)
            client = SwarmModel(MODEL_ID, model_dir, swarm.initial_peers)
            try:
                prompt_ids = client.encode(PROMPT)
                inputs = torch.tensor([prompt_ids])

                def run_local() -> int:
                    with torch.inference_mode():
                        out = local.generate(inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                             do_sample=False, pad_token_id=2)
                    return out.shape[1] - len(prompt_ids)

                def run_petals() -> int:
                    with torch.inference_mode():
                        out = client.model.generate(inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                                    do_sample=False)
                    return out.shape[1] - len(prompt_ids)

                def run_engine() -> int:
                    generation = client.start(prompt_ids, SamplingParams(max_tokens=args.tokens, temperature=0),
                                              WorkMeter())
                    return sum(1 for _ in generation)

                local_rate, _ = median_rate(run_local, args.tokens, args.repeats)
                petals_rate, petals_all = median_rate(run_petals, args.tokens, args.repeats)
                engine_rate, engine_all = median_rate(run_engine, args.tokens, args.repeats)
            finally:
                client.shutdown()

    print(f"tiny Llama (4 blocks), {args.tokens} greedy tokens, median of {args.repeats} runs, 2 servers on loopback")
    print(f"  local (transformers)        {local_rate:8.1f} tok/s")
    print(f"  swarm, raw Petals client    {petals_rate:8.1f} tok/s  (runs: {', '.join(f'{r:.0f}' for r in petals_all)})")
    print(f"  swarm, Far Mesh engine      {engine_rate:8.1f} tok/s  (runs: {', '.join(f'{r:.0f}' for r in engine_all)})")
    print(f"  ratio swarm/local           {petals_rate / local_rate:8.3f} (raw client), "
          f"{engine_rate / local_rate:.3f} (engine)")
    print(f"  ratio engine/raw client     {engine_rate / petals_rate:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-token cost of structured outputs (a grammar's token mask) in the coordinator, against the same round without
a mask, in one run; and the grammar libraries compared on it.

    .venv/bin/python bench/structured_mask.py [--model smollm2|tiny] [--tokens 48] [--rounds 5] [--outlines]
    .venv/bin/python bench/structured_mask.py --swarm [--model smollm2|tiny] [--tokens 48] [--rounds 2]

A *round* is what the coordinator does per token for N concurrent streams (services/coordinator/engine.py): one
LM-head pass over N last hidden states (the model's real head, oneDNN-packed as served) and N samplings. The
constrained round adds, per stream, the grammar's mask (llguidance, services/coordinator/structured.py: compute the
bitmask, unpack it, mask the logits) and telling the grammar the chosen token. Each stream is steered (a bonus on its
next token) along a valid JSON instance of the schema, so every round is a real step of a real grammar state.
Sampling is greedy (the cheapest sampler: the overhead ratio is the largest). Reported for N = 1 and 8: median ms per
round, and the overhead ratio. ``--outlines`` also times outlines-core (its index build and per-token mask) when it
is importable (it is not a dependency; install it in a scratch folder and put it on PYTHONPATH).

``--swarm``: end to end instead. A local swarm (bootstrap + 3 batching servers, as bench/concurrency_bench.py) and
the coordinator's client (services/coordinator/engine.py); 8 concurrent greedy streams of ``--tokens`` tokens,
unconstrained and constrained to ``LONG_SCHEMA`` (a JSON array that cannot end before ``--tokens``, so both runs
produce the same number of tokens), alternated ``--rounds`` times; aggregate tokens/s of each, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "format": "email"},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                         "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string"}},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "email", "role", "address", "tags", "score"],
    "additionalProperties": False,
}
INSTANCES = [  # one per stream (compact JSON, as the grammar emits it)
    {"name": f"User number {i}", "age": 20 + i, "email": f"user{i}@example.org", "role": ["admin", "user", "guest"][i % 3],
     "address": {"city": ["Oslo", "Lima", "Pune", "Kyiv"][i % 4], "zip": f"{10000 + 17 * i}"},
     "tags": ["alpha", "beta", "gamma"][: 1 + i % 3], "score": 0.5 + i}
    for i in range(8)
]


# At least 64 integers: a constrained stream cannot finish before --tokens (48), so both runs make as many tokens.
LONG_SCHEMA = {"type": "object", "properties": {"values": {"type": "array", "items": {"type": "integer"},
                                                           "minItems": 64}}, "required": ["values"]}
PROMPTS = ["List some numbers.", "Count for me.", "Give me integers.", "Numbers, please.", "Write numbers.",
           "Some integers:", "A list of values.", "Count up."]


def model_path(model: str) -> tuple[Path, str, list[str], int]:
    """(directory, model id, server spans, blocks)."""
    if model == "smollm2":
        from services.models.catalog import SMOLLM2, pull

        return pull(SMOLLM2, progress=False), SMOLLM2.model_id, ["0:10", "10:20", "20:30"], 30
    import tempfile

    from services.common.tiny_model import build_tiny_model

    path = build_tiny_model(Path(tempfile.gettempdir()) / "far-mesh-bench-tiny")
    return path, "far-mesh/tiny-llama", ["0:2", "2:3", "3:4"], 4


def swarm_streams(client, count: int, tokens: int, grammar) -> float:
    """Aggregate tokens/s of ``count`` concurrent greedy streams (one thread each, started together)."""
    import threading

    from services.coordinator.metering import WorkMeter
    from services.coordinator.sampling import SamplingParams

    barrier, produced = threading.Barrier(count), []

    def one(index: int) -> None:
        ids = client.encode(PROMPTS[index % len(PROMPTS)])
        barrier.wait()
        produced.append(sum(1 for _ in client.start(ids, SamplingParams(max_tokens=tokens, temperature=0,
                                                                          grammar=grammar), WorkMeter())))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    return sum(produced) / (time.perf_counter() - started)


def bench_swarm(args) -> list[str]:
    import tempfile

    from infra.swarm import LocalSwarm
    from services.coordinator.engine import SwarmModel
    from services.coordinator.structured import grammar_for_schema

    path, model_id, spans, blocks = model_path(args.model)
    grammar = grammar_for_schema(LONG_SCHEMA)
    names = [f"s{i}" for i in range(len(spans))]
    plain, constrained = [], []
    with LocalSwarm(path, model_id, Path(tempfile.mkdtemp(prefix="structured-bench-"))) as swarm:
        swarm.start_bootstrap()
        for name, span in zip(names, spans):
            swarm.start_node(name, span, extra_args=("--torch-threads", "1"))
        swarm.wait_online(names, blocks, timeout=300)
        client = SwarmModel(model_id, path, swarm.initial_peers, request_timeout=60)
        try:
            swarm_streams(client, 1, 4, grammar)  # warm-up (and the token table, built once)
            for _ in range(args.rounds):
                plain.append(swarm_streams(client, 8, args.tokens, None))
                constrained.append(swarm_streams(client, 8, args.tokens, grammar))
        finally:
            client.shutdown()
    base, masked = statistics.median(plain), statistics.median(constrained)
    return ["| 8 streams | tok/s per run | median |", "|---|---|---|",
            f"| plain | {' / '.join(f'{r:.1f}' for r in plain)} | {base:.1f} |",
            f"| constrained | {' / '.join(f'{r:.1f}' for r in constrained)} | {masked:.1f} |",
            f"\nper-token time, constrained vs plain: {base / masked - 1:+.1%}"]


def load(model: str):
    from services.common import petals_adapter  # noqa: F401  (offline before transformers)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(model)[0]
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


def targets(tokenizer, length: int) -> list[list[int]]:
    out = []
    for instance in INSTANCES:
        ids = tokenizer(json.dumps(instance, separators=(",", ":")), add_special_tokens=False).input_ids
        if tokenizer.convert_ids_to_tokens(ids[0]) == "\u2581":  # SentencePiece's prefix space
            ids = ids[1:]
        out.append(ids[:length])
    return out


def run_rounds(head, hidden, streams: int, tokens: int, plain, constrained, paths) -> tuple[list, list]:
    """Seconds per round without and with the mask: one head pass for ``streams`` rows, then each stream samples its
    row with its plain sampler, and again with its constrained one (the same step, interleaved, so a busy box
    slows both alike)."""
    plain_times, constrained_times = [], []
    for step in range(tokens):
        started = time.perf_counter()
        logits = head(hidden[:streams])
        for row in range(streams):
            path = paths[row]
            if step < len(path):
                logits[row, path[step]] += 1e4  # steer along the valid instance
        head_s = time.perf_counter() - started
        rows = logits.clone()
        started = time.perf_counter()
        for row in range(streams):
            plain[row].sample(logits[row])
        plain_s = time.perf_counter() - started
        started = time.perf_counter()
        for row in range(streams):
            constrained[row].sample(rows[row])
        constrained_s = time.perf_counter() - started
        plain_times.append(head_s + plain_s)
        constrained_times.append(head_s + constrained_s)
    return plain_times, constrained_times


def bench_llguidance(tokenizer, head, hidden, args) -> list[str]:
    from services.coordinator.sampling import SamplingParams, TokenSampler
    from services.coordinator.structured import GrammarConstraint, grammar_for_schema, token_table

    eos = [tokenizer.eos_token_id]
    started = time.perf_counter()
    token_table(tokenizer, eos)
    table_s = time.perf_counter() - started
    started = time.perf_counter()
    grammar = grammar_for_schema(SCHEMA)
    compile_s = time.perf_counter() - started
    params = SamplingParams(temperature=0.0)
    paths = targets(tokenizer, args.tokens)
    lines = [f"llguidance: token table {table_s * 1000:.0f} ms (once per tokenizer), schema compile "
             f"{compile_s * 1000:.1f} ms", "",
             "| streams | plain ms/round (median / mean) | constrained ms/round (median / mean) | mask ms/token "
             "(median) | overhead (median / mean) |", "|---|---|---|---|---|"]
    for streams in (1, 8):
        plain, constrained = [], []
        for _ in range(args.rounds):
            samplers = [TokenSampler(params) for _ in range(streams)]
            masked = [TokenSampler(params, constraint=GrammarConstraint(tokenizer, grammar, eos))
                      for _ in range(streams)]
            for sampler in masked:  # the grammar's first use (its matcher) is a start-up cost, not a token's
                sampler.constraint.allowed_ids(len(tokenizer))
            times = run_rounds(head, hidden, streams, args.tokens, samplers, masked, paths)
            plain += times[0]
            constrained += times[1]
        base_median, masked_median = statistics.median(plain), statistics.median(constrained)
        base_mean, masked_mean = statistics.fmean(plain), statistics.fmean(constrained)
        lines.append(f"| {streams} | {base_median * 1000:.2f} / {base_mean * 1000:.2f} | {masked_median * 1000:.2f} / "
                     f"{masked_mean * 1000:.2f} | {(masked_median - base_median) * 1000 / streams:.3f} | "
                     f"{masked_median / base_median - 1:+.1%} / {masked_mean / base_mean - 1:+.1%} |")
    return lines


def bench_outlines(tokenizer, args) -> list[str]:
    try:
        import numpy as np
        import outlines_core
    except ImportError:
        return ["outlines-core: not importable (skipped)"]
    from services.coordinator.structured import token_table

    table = token_table(tokenizer, [tokenizer.eos_token_id])
    vocab: dict[bytes, list[int]] = {}
    for token_id in range(table.vocab_size):
        if token_id == tokenizer.eos_token_id or table.is_special_token(token_id):
            continue
        vocab.setdefault(table.decode_bytes([token_id]), []).append(token_id)
    started = time.perf_counter()
    regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern="")
    index = outlines_core.Index(regex, outlines_core.Vocabulary(tokenizer.eos_token_id, vocab))
    build_s = time.perf_counter() - started
    mask = np.zeros((table.vocab_size + 31) // 32, dtype=np.int32)
    per_token = []
    for path in targets(tokenizer, args.tokens):
        guide = outlines_core.Guide(index)
        for token in path:
            started = time.perf_counter()
            guide.write_mask_into(mask.ctypes.data, mask.size, 4)
            np.unpackbits(mask.view(np.uint8), bitorder="little")
            guide.advance(token, return_tokens=False)
            per_token.append(time.perf_counter() - started)
    return [f"outlines-core: index build {build_s * 1000:.0f} ms (per schema), mask + advance "
            f"{statistics.median(per_token) * 1000:.3f} ms/token (median), schema features: regex only (no "
            f"recursion; format email refused or approximated)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--outlines", action="store_true")
    parser.add_argument("--swarm", action="store_true", help="end to end through a local swarm")
    args = parser.parse_args()
    if args.swarm:
        import torch

        torch.set_num_threads(1)
        lines = bench_swarm(args)
        print(f"model {args.model}, {args.tokens} greedy tokens per stream, 8 streams, {args.rounds} rounds")
        print("\n".join(lines))
        return

    import torch

    from services.common.packed_linear import PackedHead

    torch.set_num_threads(1)  # the coordinator's TORCH_THREADS default
    tokenizer, model = load(args.model)
    head = PackedHead(model.lm_head)
    hidden = torch.randn(8, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        lines = bench_llguidance(tokenizer, head, hidden, args)
        if args.outlines:
            lines += ["", *bench_outlines(tokenizer, args)]
    print(f"model {args.model}, vocab {len(tokenizer)}, {args.tokens} tokens per stream, median of {args.rounds} runs")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

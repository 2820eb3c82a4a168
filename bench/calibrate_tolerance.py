"""Calibrate the spot checks' tolerances (issue 17, docs/verification.md "Calibration of the tolerance").

    .venv/bin/python bench/calibrate_tolerance.py [--smollm2 DIR] [--length 48] [--steps 8] [--skip-smollm2]

Two honest servers never agree bit for bit. This measures how far apart they are, in the check's own metric
(``verification.relative_error``: max over positions of ||a - b|| / ||b||), for spans of the tiny toy model (0:4)
and of SmolLM2-135M (blocks 0:10, 10:20, 20:30 and all 30 in one span, the model built by ``far-mesh models pull smollm2-135m-instruct``),
in float32, float16 and bfloat16, with the block a Petals server runs (``petals.models.llama.block.WrappedLlamaBlock``,
weights from the model), on this machine's CPU.

The reference is what a verifier computes: one stateless forward of the whole prefix, batch 1, every thread.
Each way an honest server may compute the same outputs differently is compared with it:

* ``incremental``: what the checked server did in the user's session: the prompt as one step, then one position
  per step with the attention cache (Petals' ``layer_past``); every position compared;
* ``chunked``: the prefix prefilled in chunks of 16 positions with the cache (a server that splits a long prefill);
* ``batched``: the same sequence as row 0 of a batch of 4 (a server batching requests);
* ``threads``: the reference computed with one thread (other reduction splits);
* ``vs-float32``: (float16 / bfloat16 only) a float32 server against this dtype's (mixed hardware; a check of two
  servers of different dtypes uses the coarser dtype's tolerance).

For scale, ``lie: skip`` is the smallest per-position error of a server that skips its blocks (returns its inputs).

It prints the max relative error per model, span, dtype and way, the max per dtype, and the tolerances
(``TOLERANCES``: servers of one dtype; ``MIXED_TOLERANCES``: a half-precision server against a finer one) as
multiples of those maxima. Runs in ~1 min on two CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from services.common import petals_adapter  # noqa: E402,F401  (must precede petals / transformers)

import torch  # noqa: E402

from services.coordinator.verification import MIXED_TOLERANCES, TOLERANCES, relative_error  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TEXT = ("def compute(a, b):\n    \"\"\"Return the sum and the product of a and b.\"\"\"\n    total = a + b\n"
        "    product = a * b\n    return total, product\n\n"
        "The quick brown fox jumps over the lazy dog while the mesh routes every token through three servers. "
        "Providers are paid in FAR for the blocks they serve; a coordinator re-runs a sample of their work on "
        "other servers and compares the hidden states, position by position, within a tolerance.\n"
        "class Node:\n    def __init__(self, peer_id, blocks):\n        self.peer_id = peer_id\n"
        "        self.blocks = blocks\n\n    def serves(self, block):\n        return block in self.blocks\n"
        "Once upon a time, in a small village by the sea, there lived an old fisherman and his three daughters. ")


def load(model_dir: Path):
    from petals.models.llama.block import WrappedLlamaBlock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    model.eval()
    blocks = []
    for layer in model.model.layers:
        block = WrappedLlamaBlock(model.config)
        block.load_state_dict(layer.state_dict(), strict=False)  # rotary buffers are rebuilt by the block itself
        block.eval()
        blocks.append(block)
    return tokenizer, model, blocks


def token_rows(tokenizer, vocab: int, rows: int, length: int) -> torch.Tensor:
    ids = tokenizer(TEXT * 4).input_ids
    out = []
    for r in range(rows):
        window = ids[r * length // 2: r * length // 2 + length]
        if len(window) < length:  # a tokenizer with few pieces: pad with a fixed pseudo-random tail
            g = torch.Generator().manual_seed(r)
            window = window + torch.randint(3, vocab, (length - len(window),), generator=g).tolist()
        out.append(window)
    return torch.tensor(out)


def span_forward(blocks, hidden: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        hidden = block(hidden)[0]
    return hidden


def span_incremental(blocks, hidden: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """The prefix in steps of ``chunks`` positions, each step with the cache of the previous ones."""
    caches = [None] * len(blocks)
    outputs, start = [], 0
    for size in chunks:
        h = hidden[:, start:start + size]
        for i, block in enumerate(blocks):
            h, caches[i] = block(h, layer_past=caches[i], use_cache=True)
        outputs.append(h)
        start += size
    assert start == hidden.shape[1]
    return torch.cat(outputs, dim=1)


def measure(name: str, model_dir: Path, spans: list[tuple[int, int]], length: int, steps: int) -> dict:
    """{(span, dtype, way): max relative error}."""
    tokenizer, model, all_blocks = load(model_dir)
    ids = token_rows(tokenizer, model.config.vocab_size, 4, length)
    threads = torch.get_num_threads()
    with torch.inference_mode():
        embeds = model.model.embed_tokens(ids)  # [4, length, hidden], float32
        # each span's input: the float32 hidden states after the blocks before it (what the previous server sent)
        hidden = [embeds]
        for block in all_blocks[:max(start for start, _ in spans)]:
            hidden.append(block(hidden[-1])[0])
        inputs = {(start, end): hidden[start] for start, end in spans}
        results, lies = {}, {}
        reference32 = {}
        for dtype_name, dtype in DTYPES.items():
            for (start, end), x in inputs.items():
                blocks = [copy.deepcopy(b).to(dtype) for b in all_blocks[start:end]]  # the float32 weights stay
                x = x.to(dtype)
                one = x[:1]
                reference = span_forward(blocks, one)
                if dtype_name == "float32":
                    reference32[(start, end)] = reference
                prompt = length - steps
                ways = {
                    "incremental": span_incremental(blocks, one, [prompt] + [1] * steps),
                    "chunked": span_incremental(blocks, one, [16] * (length // 16) + ([length % 16] if length % 16
                                                                                       else [])),
                    "batched": span_forward(blocks, x)[:1],
                }
                torch.set_num_threads(1)
                try:
                    ways["threads"] = span_forward(blocks, one)
                finally:
                    torch.set_num_threads(threads)
                if dtype_name != "float32":
                    ways["vs-float32"] = reference32[(start, end)]
                for way, out in ways.items():
                    results[((start, end), dtype_name, way)] = relative_error(out, reference)
                # what a lie looks like against the same reference: a server that skips its blocks (returns its
                # inputs); the smallest per-position error is what a check of one position would see
                skip = (torch.linalg.vector_norm((one - reference).float(), dim=-1)
                        / torch.linalg.vector_norm(reference.float(), dim=-1))
                lies[((start, end), dtype_name)] = float(skip.min())
    print(f"\n{name}: {model.config.num_hidden_layers} blocks, hidden {model.config.hidden_size}, "
          f"{length} positions ({length - steps} prompt + {steps} steps), {threads} threads")
    ways = ["incremental", "chunked", "batched", "threads", "vs-float32"]
    print(f"  {'span':<7} {'dtype':<9} " + " ".join(f"{w:>12}" for w in ways) + f" {'lie: skip':>12}")
    for (start, end) in inputs:
        for dtype_name in DTYPES:
            cells = [results.get(((start, end), dtype_name, w)) for w in ways]
            print(f"  {start:>2}:{end:<4} {dtype_name:<9} " + " ".join(
                f"{'-':>12}" if c is None else f"{c:12.2e}" for c in cells) + f" {lies[((start, end), dtype_name)]:12.2e}")
    return results, lies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smollm2", type=Path, default=None, help="SmolLM2 directory (default: the catalog build)")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--length", type=int, default=48, help="positions of the prefix")
    parser.add_argument("--steps", type=int, default=8, help="single-position steps at its end (incremental)")
    args = parser.parse_args()
    started = time.monotonic()
    torch.manual_seed(0)

    from services.common.tiny_model import build_tiny_model

    results, all_lies = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_model(Path(tmp) / "tiny")
        results["tiny (4 blocks)"], all_lies["tiny"] = measure("tiny toy model", tiny, [(0, 4)], args.length,
                                                               args.steps)
    if not args.skip_smollm2:
        smollm2 = args.smollm2
        if smollm2 is None:
            from services.models.catalog import CATALOG, pull

            smollm2 = pull(CATALOG["smollm2-135m-instruct"])
        results["SmolLM2-135M"], all_lies["SmolLM2"] = measure(
            "SmolLM2-135M", smollm2, [(0, 10), (10, 20), (20, 30), (0, 30)], args.length, args.steps)

    def margin(tolerance: float, worst: float) -> str:
        return f"{tolerance / worst:7.1f}x" if worst > 0 else "     inf"

    print("\nlargest honest disagreement per dtype (all ways, all spans) and the tolerance as a multiple of it:")
    print(f"  {'dtype':<9} {'model':<16} {'same dtype':>10} {'tolerance':>9} {'margin':>8}   "
          f"{'vs float32':>10} {'mixed tol.':>10} {'margin':>8}")
    for dtype_name in DTYPES:
        for model_name, res in results.items():
            same = max(v for (span, d, way), v in res.items() if d == dtype_name and way != "vs-float32")
            mixed = [v for (span, d, way), v in res.items() if d == dtype_name and way == "vs-float32"]
            line = (f"  {dtype_name:<9} {model_name:<16} {same:10.2e} {TOLERANCES[dtype_name]:9.0e} "
                    f"{margin(TOLERANCES[dtype_name], same)}")
            if mixed:
                line += (f"   {max(mixed):10.2e} {MIXED_TOLERANCES[dtype_name]:10.0e} "
                         f"{margin(MIXED_TOLERANCES[dtype_name], max(mixed))}")
            print(line)
        skips = [v for res_lies in all_lies.values() for (span, d), v in res_lies.items() if d == dtype_name]
        print(f"  {dtype_name:<9} smallest error of a server skipping its blocks: {min(skips):.2e}")
    print(f"\n({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()

"""A chat at conversation speed: time to first token per turn of a 10-turn SmolLM2 conversation, with and
without prefix reuse (docs/prefix-reuse.md), through a 3-server swarm (0:10, 10:20, 20:30) and the coordinator's
engine (services/coordinator/engine.py, in process).

    .venv/bin/python bench/chat_bench.py [--turns 10] [--max-tokens 32]

Each turn renders the whole conversation with the model's chat template (a long system prompt, every question
and answer so far, the new question), as every chat client re-sends it. The same prompt is generated twice, in
turn: without reuse (``reuse_key`` None: a full prefill, the path of a request without an account; only its first
token) and with reuse (the account's parked session of the previous turn continued: only the new positions
computed; the whole answer, which the next turn's history holds). Their first tokens must be identical (the
tests check whole answers). Prints TTFT per turn, the cached prompt tokens, and the ratios turn N /
turn 1 for each series. Everything it starts is stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPANS = {"a": "0:10", "b": "10:20", "c": "20:30"}
SYSTEM = " ".join([
    "You are the reference assistant of a public library in a small European town.",
    "You answer questions about the library's rules, its collections, its opening hours and its events.",
    "The library opens at nine in the morning and closes at seven in the evening from Monday to Friday,",
    "and at one in the afternoon on Saturday; it is closed on Sunday and on public holidays.",
    "A reader may borrow up to eight books, four magazines and two films at once, for three weeks;",
    "a loan may be renewed twice, online or at the desk, unless another reader has reserved the item.",
    "Late returns cost ten cents per item and per day, at most five euros per item.",
    "The children's section is on the ground floor, the reading room and the local history archive",
    "on the first floor, the computer room and the study rooms on the second floor.",
    "Study rooms are booked at the desk or by telephone, for two hours at most, and hold up to six people.",
    "The archive keeps the town's newspapers since 1850, maps, photographs and parish registers;",
    "its documents are consulted in the reading room only, with pencils, never pens.",
]) * 7  # a long system prompt, as many chat deployments have
QUESTIONS = [
    "How many books can I borrow at once, and for how long? Please answer in two sentences.",
    "I returned three books five days late. How much do I owe the library, exactly?",
    "Where can I find old maps of the town, and may I take them home to study them?",
    "My daughter is seven. Which floor should we visit first, and is there anything for her age?",
    "Can I book a study room for a group of eight students on Saturday afternoon?",
    "What do I need to bring to consult the parish registers of the nineteenth century?",
    "Is the library open on Easter Monday, and until what time on a normal Friday?",
    "How do I renew a film that I borrowed two weeks ago, if nobody has reserved it?",
    "What is the maximum fine for a single magazine that I forgot to return for two months?",
    "Summarize the three most important rules of the archive for a first-time visitor.",
]


def run_turn(client, prompt_ids, max_tokens, reuse_key):
    from services.coordinator.metering import WorkMeter
    from services.coordinator.sampling import SamplingParams

    started = time.perf_counter()
    generation = client.start(prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0), WorkMeter(),
                              reuse_key=reuse_key)
    ttft, tokens = None, []
    for delta in generation:
        if ttft is None:
            ttft = time.perf_counter() - started
        tokens.append(delta.token_id)
    return ttft, tokens, generation


def conversation(client, turns: int, max_tokens: int) -> list[dict]:
    from services.coordinator.openai_protocol import ChatMessage, render_chat

    messages = [ChatMessage(role="system", content=SYSTEM)]
    rows = []
    for turn in range(turns):
        messages.append(ChatMessage(role="user", content=QUESTIONS[turn % len(QUESTIONS)]))
        prompt, _ = render_chat(client.tokenizer, messages)
        prompt_ids = client.encode(prompt)
        # without reuse: only the first token (its TTFT; the full prefill is all that differs)
        full_ttft, full_tokens, _ = run_turn(client, prompt_ids, 1, None)
        reuse_ttft, reuse_tokens, generation = run_turn(client, prompt_ids, max_tokens, "bench-account")
        assert reuse_tokens[:1] == full_tokens, f"turn {turn + 1}: the first token with reuse differs"
        rows.append(dict(turn=turn + 1, prompt=len(prompt_ids), cached=generation.cached_tokens,
                         full=full_ttft, reuse=reuse_ttft))
        print(f"turn {turn + 1:2d}: prompt {len(prompt_ids):5d} tokens, cached {generation.cached_tokens:5d}: "
              f"TTFT without reuse {full_ttft:6.2f} s, with reuse {reuse_ttft:6.2f} s", flush=True)
        messages.append(ChatMessage(role="assistant", content=generation.text.emitted))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    from services.common import petals_adapter  # noqa: F401  (before petals)
    import torch

    from infra.swarm import LocalSwarm
    from services.coordinator.engine import SwarmModel
    from services.models.catalog import SMOLLM2, pull

    torch.set_num_threads(1)  # the coordinator's default (TORCH_THREADS)
    model_dir = pull(SMOLLM2, progress=False)
    with tempfile.TemporaryDirectory(prefix="chat-bench-") as tmp:
        with LocalSwarm(model_dir, SMOLLM2.model_id, Path(tmp) / "swarm") as swarm:
            swarm.start_bootstrap()
            for name, span in SPANS.items():
                swarm.start_node(name, span)
            swarm.wait_online(list(SPANS), SMOLLM2.num_blocks, timeout=300)
            # the longest TTL: between two turns with reuse this bench runs a full prefill (a minute or more on a
            # loaded 2-core box), and a chat's user takes time to read and type too
            client = SwarmModel(SMOLLM2.model_id, model_dir, swarm.initial_peers, request_timeout=120,
                                prefix_reuse={"ttl_s": 240, "max_sessions": 16})
            try:
                run_turn(client, client.encode("Hello"), 4, None)  # warm-up: connections, step budgets
                rows = conversation(client, args.turns, args.max_tokens)
            finally:
                client.shutdown()
    first, last = rows[0], rows[-1]
    print(f"\nturn {last['turn']} / turn 1 TTFT: without reuse {last['full'] / first['full']:.2f}x, "
          f"with reuse {last['reuse'] / first['reuse']:.2f}x; turn {last['turn']} with / without reuse "
          f"{last['reuse'] / last['full']:.2f}x ({last['prompt']} prompt tokens, {last['cached']} cached)")
    print("| turn | prompt tokens | cached | TTFT without reuse (s) | TTFT with reuse (s) | with / without |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['turn']} | {row['prompt']} | {row['cached']} | {row['full']:.2f} | {row['reuse']:.2f} | "
              f"{row['reuse'] / row['full']:.2f} |")


if __name__ == "__main__":
    main()

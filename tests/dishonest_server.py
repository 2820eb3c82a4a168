"""TEST ONLY: a Petals server child whose blocks lie. Not part of the shipped node: it lives under
tests/ and is started through ``far-node run --server-command`` (the hidden test hook that already stands in
for the server child), e.g. ``--server-command "python tests/dishonest_server.py --mode noise --fraction 1"``.

It patches the server's inference path (``petals.server.handler.iterate_rpc_inference``, what a user's session
gets) and then runs the normal entry point, ``node_server.petals_server.main``. On a random ``fraction`` of
steps it returns, instead of the computed hidden states:

* ``noise``: the outputs plus Gaussian noise of ``--scale`` x each position's norm (a sloppy or lossy server);
* ``skip``: the step's inputs, i.e. it skipped its blocks (a server that saves the compute);
* ``agreed``: the outputs times 1.3, the same on every server of this mode: colluders that agree on one wrong
  answer (with ``--advertise-rps`` tiny, users are routed elsewhere, so what they answer wrongly is the checks of
  other servers that they are asked to verify).

Checks reach a server as inference sessions (``rpc_inference``, like a user's stream taking over a span), so
these lies reach the checks too: a server cannot be honest with users and lie only when verifying.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: importable from anywhere


def install(mode: str, fraction: float, scale: float, seed: int) -> None:
    from services.common import petals_adapter  # noqa: F401  (before petals)
    import petals.server.handler as handler
    import torch
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor

    original = handler.iterate_rpc_inference
    rng = random.Random(seed)

    async def iterate_rpc_inference(*args, input_iterator, **kwargs):
        last_inputs = {}

        async def spy():
            async for request, metadata in input_iterator:
                if request.tensors:
                    last_inputs["hidden"] = request.tensors[0]
                yield request, metadata

        async for output_tensors, can_push in original(*args, input_iterator=spy(), **kwargs):
            if output_tensors and rng.random() < fraction:
                proto = output_tensors[0]
                honest = deserialize_torch_tensor(proto)
                if mode == "agreed":
                    lie = honest.float() * 1.3
                elif mode == "skip" and "hidden" in last_inputs:
                    lie = deserialize_torch_tensor(last_inputs["hidden"]).to(honest.dtype)[:, -honest.shape[1]:]
                else:
                    noise = torch.randn_like(honest.float()) / honest.shape[-1] ** 0.5
                    lie = honest.float() + scale * honest.float().norm(dim=-1, keepdim=True) * noise
                output_tensors = [serialize_torch_tensor(lie.to(honest.dtype), proto.compression),
                                  *output_tensors[1:]]
            yield output_tensors, can_push

    handler.iterate_rpc_inference = iterate_rpc_inference


def advertise_speed(inference_rps: float) -> None:
    """Announce this inference speed: a huge one, so clients' min-latency routing prefers this server (a cheater
    wants the traffic; it also makes the tests deterministic), or a tiny one, so users are routed elsewhere."""
    import petals.server.server as server

    honest_init = server.Server.__init__

    def __init__(self, *args, **kwargs):
        honest_init(self, *args, **kwargs)
        self.server_info.inference_rps = inference_rps  # announced with every DHT declaration from now on

    server.Server.__init__ = __init__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("noise", "skip", "agreed"), default="noise")
    parser.add_argument("--fraction", type=float, default=1.0, help="share of steps that lie")
    parser.add_argument("--scale", type=float, default=0.05, help="noise: relative size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--advertise-rps", type=float, default=1e6, help="announced inference speed (0 = honest)")
    args, rest = parser.parse_known_args()
    install(args.mode, args.fraction, args.scale, args.seed)
    if args.advertise_rps > 0:
        advertise_speed(args.advertise_rps)
    from node_server.petals_server import main as server_main

    server_main(rest)


if __name__ == "__main__":
    main()

"""Naming shared by servers and clients of one model's swarm (pure, network-free)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_PREFIX_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def dht_prefix_for(model_id: str) -> str:
    """The DHT prefix servers announce blocks under. Petals leaves it unset for a local model directory, and
    '.'/' ' are delimiters in its block UIDs, so it is always derived explicitly from the model id."""
    prefix = _PREFIX_UNSAFE.sub("-", model_id).strip("-")
    if not prefix:
        raise ValueError(f"model id {model_id!r} gives an empty DHT prefix")
    return prefix


def block_uids(model_id: str, num_blocks: int) -> list[str]:
    prefix = dht_prefix_for(model_id)
    return [f"{prefix}.{index}" for index in range(num_blocks)]


@dataclass(frozen=True)
class BlockSpan:
    """Blocks [start, end) of a model."""

    start: int
    end: int

    @classmethod
    def parse(cls, text: str, num_blocks: int | None = None) -> "BlockSpan":
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
        if not match:
            raise ValueError(f"block span {text!r} is not of the form START:END (e.g. 0:2)")
        span = cls(int(match.group(1)), int(match.group(2)))
        if span.end <= span.start:
            raise ValueError(f"block span {text!r} is empty: END must be greater than START")
        if num_blocks is not None and span.end > num_blocks:
            raise ValueError(f"block span {text!r} goes past the model's {num_blocks} blocks")
        return span

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"

    @property
    def length(self) -> int:
        return self.end - self.start

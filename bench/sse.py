"""One streamed generation through a coordinator's SSE endpoint, timed: shared by the benchmarks."""

from __future__ import annotations

import time

import httpx
from httpx_sse import EventSource


def stream_generation(url: str, key: str, prompt: str, tokens: int, on_token=None) -> dict:
    """POST /mesh/inference/generate (greedy) and read it to the end. Returns ``elapsed`` (request to last event),
    ``ttft``, the arrival ``stamps`` of each token event and the token count; ``on_token(n, event)`` is called as each
    token arrives (e.g. to kill a server mid-stream)."""
    started = time.perf_counter()
    stamps = []
    payload = {"prompt": prompt, "max_tokens": tokens, "temperature": 0}
    with httpx.stream("POST", f"{url}/mesh/inference/generate", json=payload, timeout=600,
                      headers={"Authorization": f"Bearer {key}"}) as response:
        response.raise_for_status()
        for sse in EventSource(response).iter_sse():
            event = sse.json()
            if not event.get("done"):
                stamps.append(time.perf_counter())
                if on_token is not None:
                    on_token(len(stamps), event)
    return {"elapsed": time.perf_counter() - started, "ttft": stamps[0] - started if stamps else float("nan"),
            "stamps": stamps, "tokens": len(stamps)}

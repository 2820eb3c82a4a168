"""Several choices of one request (``n``): n generations of the same prompt run side by side, each with its own
sampler (seed, seed + 1, …) and its own inference session, metered into one ``WorkMeter``. To the serving layer
they are one ``EngineGeneration`` whose token deltas name their choice and count the tokens of all choices, so a
request is admitted, reserved, checkpointed and settled once, every choice billed for the tokens it generated."""

from __future__ import annotations

import queue
import threading
from dataclasses import replace
from typing import Iterator, Optional

from services.coordinator.engine_protocol import EngineGeneration, TokenDelta

JOIN_TIMEOUT_S = 60.0  # after a failure the other choices stop within one step (they share the cancel event)


def choice_seed(seed: Optional[int], choice: int) -> Optional[int]:
    """Choice i samples with seed + i: the same request with the same seed gives the same choices."""
    return None if seed is None else seed + choice


class ChoiceGenerations:
    """n generations as one. ``text`` and the session's finish reason are the first choice's (what the session row
    stores); ``choice_results()`` has every choice's text, finish reason and token count."""

    cached_tokens = 0  # n > 1 choices never continue a parked session (prefix reuse is per single stream)

    def __init__(self, generations: list[EngineGeneration], cancel: threading.Event):
        self.generations = generations
        self.cancel = cancel
        self.text = generations[0].text

    @property
    def session_id(self) -> Optional[str]:
        return getattr(self.generations[0], "session_id", None)

    @session_id.setter
    def session_id(self, value: Optional[str]) -> None:
        for generation in self.generations:
            generation.session_id = value

    @property
    def finish_reason(self) -> Optional[str]:
        reasons = [generation.finish_reason for generation in self.generations]
        return "cancelled" if "cancelled" in reasons else reasons[0]

    @property
    def completion_tokens(self) -> int:
        return sum(generation.completion_tokens for generation in self.generations)

    def route(self) -> list:
        return self.generations[0].route()

    def replaced_servers(self) -> list:
        return [server for generation in self.generations for server in generation.replaced_servers()]

    def choice_results(self) -> list[dict]:
        return [{"index": i, "text": g.text.emitted, "finish_reason": g.finish_reason,
                 "completion_tokens": g.completion_tokens} for i, g in enumerate(self.generations)]

    def __iter__(self) -> Iterator[TokenDelta]:
        events: queue.Queue = queue.Queue()

        def run(choice: int, generation: EngineGeneration) -> None:
            try:
                for delta in generation:
                    events.put((choice, delta, None))
            except BaseException as error:  # noqa: BLE001 - handed to the iterating thread
                events.put((choice, None, error))
            finally:
                events.put((choice, None, None))

        threads = [threading.Thread(target=run, args=(i, g), name=f"choice-{i}", daemon=True)
                   for i, g in enumerate(self.generations)]
        for thread in threads:
            thread.start()
        running, total, failure = len(threads), 0, None
        while running:  # every generation ends: by its own finish, max_tokens or the shared cancel event
            choice, delta, error = events.get()
            if delta is not None:
                total += 1
                yield replace(delta, index=total, choice=choice)
            elif error is not None:
                failure = failure or error
                self.cancel.set()  # one choice failed: the request fails, the others stop
            else:
                running -= 1
        for thread in threads:
            thread.join(JOIN_TIMEOUT_S)
        if failure is not None:
            raise failure

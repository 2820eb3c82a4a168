"""One LM-head pass for all concurrent generations (pure torch + threads; no network).

The coordinator computes every token's logits itself (Petals keeps embeddings and the LM head on the client).
For SmolLM2 the head is a 49,152 × 576 float32 matrix, 113 MB read per token: on a memory-bound CPU a large part
of a token's whole time (docs/batching.md), and it is the same matrix for every stream. Each
generation runs in its own thread; ``LogitsBatcher.logits`` stacks the last hidden states of the generations
that are at this point at the same time into one ``[rows, hidden]`` pass, so the weights are read once per
round instead of once per stream.

It also keeps concurrent streams in phase, which is what lets the servers batch them (docs/batching.md): streams
that get their logits in one pass send their next steps together, so each server sees them as one batch. Left
alone, N streams through 3 servers spread out into small groups, one per stage of the pipeline (measured on
SmolLM2, 8 streams: passes of ~1.5 rows everywhere). So a pass waits for every member that is decoding: each
member is *due* back ``late_factor`` × the members' typical time between two requests (the time a token spends in
the servers, an exponential average) after its last logits. A pass goes when every member is here or past its
due time, and never waits more than ``max_wait_s``. A lone member, or one whose batch-mates are all here, never
waits; a member that is late (a failover replay, a slow server) is not waited for again until it is back; a
new member (its prompt still in the servers) is not due until its first logits.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

import torch

DEFAULT_MAX_WAIT_S = 0.5
DEFAULT_LATE_FACTOR = 1.5
DEFAULT_MAX_ROWS = 64
_EMA = 0.2  # weight of the newest time between two requests in the typical one


class _Request:
    __slots__ = ("member", "hidden", "logits", "error", "done")

    def __init__(self, member: int, hidden: torch.Tensor):
        self.member = member
        self.hidden = hidden
        self.logits: Optional[torch.Tensor] = None
        self.error: Optional[BaseException] = None
        self.done = False


class LogitsBatcher:
    """``head``: ``[rows, hidden] -> [rows, vocab]`` (the model's LM head). Thread-safe.

    Each generation ``join()``s once (a member id), calls ``logits(member, hidden)`` with its ``[hidden]`` last
    hidden state for each token, and ``leave(member)``s when it ends (also on errors and cancels: a member that
    never leaves is waited for until it is late)."""

    def __init__(self, head: Callable[[torch.Tensor], torch.Tensor], *, max_wait_s: float = DEFAULT_MAX_WAIT_S,
                 late_factor: float = DEFAULT_LATE_FACTOR, max_rows: int = DEFAULT_MAX_ROWS):
        if max_wait_s < 0 or late_factor < 0 or max_rows < 1:
            raise ValueError("max_wait_s and late_factor must be >= 0, max_rows >= 1")
        self.head = head
        self.max_wait_s = max_wait_s
        self.late_factor = late_factor
        self.max_rows = max_rows
        self._cond = threading.Condition()
        self._next_member = 0
        self._members: set[int] = set()
        self._last_done: dict[int, float] = {}  # member -> when it got its last logits (decoding members)
        self._typical_away_s: Optional[float] = None  # between a member's logits and its next request
        self._pending: list[_Request] = []
        self._computing = False
        self.passes = 0  # counters (rows / passes = the average batch)
        self.rows = 0

    def join(self) -> int:
        with self._cond:
            self._next_member += 1
            self._members.add(self._next_member)
            return self._next_member

    def leave(self, member: int) -> None:
        with self._cond:
            self._members.discard(member)
            self._last_done.pop(member, None)
            self._cond.notify_all()  # a pass waiting for this member goes now

    def logits(self, member: int, hidden: torch.Tensor) -> torch.Tensor:
        """The ``[vocab]`` float32 logits of one ``[hidden]`` state (computed in a pass with other members')."""
        request = _Request(member, hidden.reshape(1, -1))
        with self._cond:
            last = self._last_done.get(member)
            if last is not None:
                away = time.monotonic() - last
                typical = self._typical_away_s
                self._typical_away_s = away if typical is None else (1 - _EMA) * typical + _EMA * away
            self._pending.append(request)
            self._cond.notify_all()
            while not request.done:
                if self._computing:
                    self._cond.wait()
                    continue
                batch = self._take_when_ready(request)
                if batch is None:
                    continue  # woke up: someone else took the work, or it is time to check again
                self._run(batch)
        if request.error is not None:
            raise request.error
        return request.logits

    def _take_when_ready(self, request: _Request) -> Optional[list[_Request]]:
        """Under the lock: wait until every decoding member is pending or past its due time (at most ``max_wait_s``),
        then take up to ``max_rows`` requests. None if another thread took the work meanwhile (``request`` may be
        done)."""
        give_up = time.monotonic() + self.max_wait_s
        while True:
            if request.done or self._computing or not self._pending:
                return None
            arrived = {r.member for r in self._pending}
            due = self._latest_due(arrived)
            now = time.monotonic()
            if due is None or due <= now or now >= give_up or len(self._pending) >= self.max_rows:
                batch, self._pending = self._pending[:self.max_rows], self._pending[self.max_rows:]
                return batch
            self._cond.wait(min(due, give_up) - now)

    def _latest_due(self, arrived: set[int]) -> Optional[float]:
        """When the last of the decoding members that are not here is due back (None: all here)."""
        missing = [last for member, last in self._last_done.items() if member not in arrived]
        if not missing:
            return None
        return max(missing) + self.late_factor * (self._typical_away_s or 0.0)

    def _run(self, batch: list[_Request]) -> None:
        """Under the lock on entry and exit; computes with the lock released."""
        self._computing = True
        self._cond.release()
        try:
            try:
                logits = self.head(torch.cat([r.hidden for r in batch], dim=0)).float()
                results, error = list(logits), None
            except BaseException as exc:  # every request of the pass gets the error (its own stream ends)
                results, error = [None] * len(batch), exc
        finally:
            self._cond.acquire()
            self._computing = False
        now = time.monotonic()
        for request, row in zip(batch, results):
            request.logits, request.error, request.done = row, error, True
            if request.member in self._members:
                self._last_done[request.member] = now
        self.passes += 1
        self.rows += len(batch)
        self._cond.notify_all()

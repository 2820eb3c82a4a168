"""Admission of generations per model: a bounded number running, a bounded queue with a bounded wait, and a
clear ``503 overloaded`` (with ``Retry-After``) beyond it — never a silent, unbounded queue (docs/generation.md
"Concurrency"). Servers batch concurrent sessions' steps (docs/batching.md), so up to ``max_running`` streams
share the swarm's passes; more would only lengthen every stream's step time."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable, Optional


class Overloaded(Exception):
    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AdmissionGate:
    """FIFO slots of one model (event-loop only, no locks needed)."""

    def __init__(self, model_id: str, *, max_running: int, max_waiting: int, max_wait_s: float,
                 retry_after_s: int = 2, on_change: Optional[Callable[["AdmissionGate"], None]] = None):
        self.model_id = model_id
        self.max_running, self.max_waiting, self.max_wait_s = max_running, max_waiting, max_wait_s
        self.retry_after_s = retry_after_s
        self.running = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._on_change = on_change or (lambda gate: None)

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    async def acquire(self) -> Callable[[], None]:
        """Wait for a slot (at most ``max_wait_s``); returns the slot's idempotent ``release``."""
        if self.running < self.max_running and not self.waiting:
            self.running += 1
            self._on_change(self)
            return self._releaser()
        if self.waiting >= self.max_waiting:
            raise Overloaded(f"model {self.model_id!r} is at capacity ({self.running} generations running, "
                             f"{self.waiting} waiting); retry in {self.retry_after_s} s", self.retry_after_s)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._on_change(self)
        started = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout=self.max_wait_s)
        except asyncio.TimeoutError:
            if waiter.done() and not waiter.cancelled():  # the slot arrived as the wait ran out: keep it
                return self._releaser()
            waiter.cancel()
            raise Overloaded(f"model {self.model_id!r} is at capacity: no generation slot freed within "
                             f"{time.monotonic() - started:.0f} s; retry in {self.retry_after_s} s",
                             self.retry_after_s) from None
        except BaseException:  # the client went away while waiting
            if waiter.done() and not waiter.cancelled():
                self._release()  # it was handed a slot: pass it on
            else:
                waiter.cancel()
            raise
        finally:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass
            self._on_change(self)
        return self._releaser()

    def _releaser(self) -> Callable[[], None]:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._release()

        return release

    def _release(self) -> None:
        while self._waiters:  # hand the slot to the first waiter still waiting (running stays the same)
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._on_change(self)
                return
        self.running -= 1
        self._on_change(self)


class TokenizerPool:
    """Tokenizing (chat template + tokenizer) off the event loop, in a pool of its own: a flood of requests cannot
    hold the threads every other part of the coordinator uses, and one account holds at most ``per_account`` of
    the ``workers`` threads at a time (its further requests wait for its own turn, not for everyone's)."""

    def __init__(self, *, workers: int = 4, per_account: int = 1):
        from concurrent.futures import ThreadPoolExecutor

        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="far-tokenize")
        self.per_account = per_account
        self._accounts: dict[Optional[str], asyncio.Semaphore] = {}
        self._users: dict[Optional[str], int] = {}

    async def run(self, account_id: Optional[str], function, *args):
        loop = asyncio.get_running_loop()
        if account_id is None:  # internal callers (no account): the pool's bound only
            return await loop.run_in_executor(self.executor, function, *args)
        semaphore = self._accounts.get(account_id)
        if semaphore is None:
            semaphore = self._accounts[account_id] = asyncio.Semaphore(self.per_account)
        self._users[account_id] = self._users.get(account_id, 0) + 1
        try:
            async with semaphore:
                return await loop.run_in_executor(self.executor, function, *args)
        finally:
            self._users[account_id] -= 1
            if not self._users[account_id]:  # nobody of this account waits: forget it (bounded memory)
                del self._users[account_id]
                del self._accounts[account_id]

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

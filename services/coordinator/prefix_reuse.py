"""Prefix reuse across requests: finished generations' open inference sessions, parked for their account.

A Petals inference session keeps, on every server of its route, the attention cache of every position it has
processed. When a generation ends, its session is *parked* here instead of closed, under (account, the exact token
ids the swarm has processed); the next request of the same account whose prompt starts with those tokens (a
chat's next turn) continues that session and sends only the new positions through the swarm. The engine
(services/coordinator/engine.py) takes and parks sessions; this module only keeps them (no petals, no torch).

Bounds (docs/prefix-reuse.md): a session stays parked at most ``ttl_s``; at most ``max_sessions`` are parked and
the servers' cache they hold (the sum of their ``max_length``) is at most ``max_tokens``; the least recently
parked is closed first. A parked session is only ever handed to the account that parked it, and to one
generation at a time (``take`` removes it). Closing happens outside the lock (it talks to the servers).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from services.common.logs import get_logger

log = get_logger(__name__)

# Petals servers end a session 30 min after it opened and 5 min after its last step (their session_timeout and
# step_timeout): a parked session older than this, or parked longer than the TTL (bounded below), is not reused.
SERVER_SESSION_MAX_AGE_S = 25 * 60
SERVER_STEP_TIMEOUT_S = 5 * 60
MAX_TTL_S = SERVER_STEP_TIMEOUT_S - 60  # a minute of margin for the reaper, a slow close, clocks
REAPER_PERIOD_S = 1.0
# The defaults of the PREFIX_REUSE_* settings (services/common/config.py holds the same values; a test checks).
DEFAULT_PREFIX_REUSE = {"ttl_s": 120.0, "max_sessions": 0, "max_tokens": 4096, "headroom_tokens": 256}


@dataclass
class ParkedSession:
    owner: str  # the account id: a session is never handed to another account
    tokens: tuple[int, ...]  # the token ids the swarm has processed in this session, in order
    max_length: int  # positions the servers allocated cache for
    session: Any  # petals InferenceSession
    opened_at: float  # monotonic, when the session was opened
    parked_at: float = 0.0


def reusable_length(needed: int, context_length: int, headroom_tokens: int, max_parked_tokens: int) -> int:
    """The ``max_length`` of a session meant for reuse: its own ``needed`` positions (prompt + max_tokens) plus room
    for the next turns, ``max(headroom_tokens, needed)`` (doubling, so a growing chat opens a fresh session only
    every few turns); at most the model's context and what may be parked (a bigger session could not be kept)."""
    return max(needed, min(context_length, max_parked_tokens, needed + max(headroom_tokens, needed)))


class ParkedSessions:
    """The parked sessions of one model (thread-safe)."""

    def __init__(self, *, ttl_s: float, max_sessions: int, max_tokens: int,
                 close: Callable[[Any], None] = lambda session: session.close(),
                 clock: Callable[[], float] = time.monotonic):
        self.ttl_s = min(float(ttl_s), MAX_TTL_S)
        self.max_sessions = int(max_sessions)
        self.max_tokens = int(max_tokens)
        self._close, self._clock = close, clock
        self._lock = threading.Lock()
        self._parked: list[ParkedSession] = []  # least recently parked first
        self._stopped = threading.Event()
        self._reaper: Optional[threading.Thread] = None

    @property
    def enabled(self) -> bool:
        return self.max_sessions > 0 and self.max_tokens > 0 and self.ttl_s > 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._parked)

    @property
    def parked_tokens(self) -> int:
        """The servers' cache the parked sessions hold, in positions (the sum of their max_length)."""
        with self._lock:
            return sum(p.max_length for p in self._parked)

    def _usable(self, parked: ParkedSession, now: float) -> bool:
        return now - parked.parked_at <= self.ttl_s and now - parked.opened_at <= SERVER_SESSION_MAX_AGE_S

    def take(self, owner: Optional[str], prompt_ids: list[int], needed: int) -> Optional[ParkedSession]:
        """The parked session of ``owner`` with the longest processed prefix of ``prompt_ids`` that leaves at least
        one new position to compute and has room for ``needed`` positions; removed from here (the caller
        continues it, then parks or closes it). None on a miss."""
        if owner is None or not self.enabled:
            return None
        now = self._clock()
        with self._lock:
            best = None
            for parked in self._parked:
                count = len(parked.tokens)
                if (parked.owner == owner and count < len(prompt_ids) and needed <= parked.max_length
                        and self._usable(parked, now) and (best is None or count > len(best.tokens))
                        and tuple(prompt_ids[:count]) == parked.tokens):
                    best = parked
            if best is not None:
                self._parked.remove(best)
        return best

    def park(self, parked: ParkedSession) -> None:
        """Keep ``parked`` for its owner, evicting (closing) the least recently parked beyond the bounds; a session
        that cannot be kept at all is closed."""
        evicted = []
        with self._lock:
            if (not self.enabled or parked.owner is None or parked.max_length > self.max_tokens
                    or self._stopped.is_set()):
                evicted.append(parked)
            else:
                parked.parked_at = self._clock()
                self._parked.append(parked)
                total = sum(p.max_length for p in self._parked)
                while len(self._parked) > self.max_sessions or total > self.max_tokens:
                    oldest = self._parked.pop(0)
                    total -= oldest.max_length
                    evicted.append(oldest)
        self._close_all(evicted, "evicted")

    def expire(self) -> int:
        """Close the sessions past their TTL or age; returns how many."""
        now = self._clock()
        with self._lock:
            expired = [p for p in self._parked if not self._usable(p, now)]
            self._parked = [p for p in self._parked if self._usable(p, now)]
        self._close_all(expired, "expired")
        return len(expired)

    def close(self, session: Any) -> None:
        """Close a session that is not parked (a miss that was not reused, a generation that failed)."""
        self._close_all([ParkedSession("", (), 0, session, 0.0)], "closed")

    def _close_all(self, sessions: list[ParkedSession], why: str) -> None:
        for parked in sessions:
            try:
                self._close(parked.session)
            except Exception as error:  # noqa: BLE001 - a server already gone: nothing left to free
                log.debug("closing an inference session failed", why=why, error=repr(error))

    def start(self) -> None:
        """Close expired sessions in the background, every ``REAPER_PERIOD_S`` (their servers hold the cache)."""
        if self._reaper is None and self.enabled:
            self._reaper = threading.Thread(target=self._reap, name="parked-sessions", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        while not self._stopped.wait(REAPER_PERIOD_S):
            self.expire()

    def shutdown(self) -> None:
        """Stop the reaper and close every parked session; later ``park`` calls close at once."""
        self._stopped.set()
        if self._reaper is not None:
            self._reaper.join(timeout=REAPER_PERIOD_S * 5)
        with self._lock:
            parked, self._parked = self._parked, []
        self._close_all(parked, "shutdown")

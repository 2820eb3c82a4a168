"""Per-provider work metering (pure, thread-safe).

Rule (docs/generation.md "Metering"): a server that computed blocks [s, e) for n token positions in a
successful step earns (e − s) × n work units; prefill counts the prompt positions, and a replay after
failover counts the replayed positions (that work was really done). ``WorkMeter.record`` is installed as the
inference session's ``on_step`` hook (``observe`` in services/common/petals_adapter/session.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class PeerWork:
    peer_id: str
    work_units: int = 0
    steps: int = 0
    spans: set = field(default_factory=set)  # {(start, end)}

    @property
    def blocks(self) -> str:
        """'0:2' or, if the peer served several spans during the session, '0:2,2:4'."""
        return ",".join(f"{s}:{e}" for s, e in sorted(self.spans))


class WorkMeter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._peers: dict[str, PeerWork] = {}
        self.version = 0  # bumps on every record; lets checkpoints skip when nothing changed

    def record(self, peer_id: str, start: int, end: int, positions: int) -> None:
        if end <= start or positions <= 0:
            raise ValueError(f"bad step: blocks {start}:{end}, positions {positions}")
        with self._lock:
            work = self._peers.setdefault(peer_id, PeerWork(peer_id))
            work.work_units += (end - start) * positions
            work.steps += 1
            work.spans.add((start, end))
            self.version += 1

    def observe_span(self, span, positions: int) -> None:
        """Adapter for petals' ``RemoteSpanInfo``."""
        self.record(span.peer_id.to_base58(), span.start, span.end, positions)

    def snapshot(self) -> list[PeerWork]:
        with self._lock:
            return [PeerWork(w.peer_id, w.work_units, w.steps, set(w.spans)) for w in self._peers.values()]

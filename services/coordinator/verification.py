"""Spot checks by redundant execution (docs/verification.md).

A sample of server steps is re-run, off the stream's path, on a *different* server that serves the same blocks: a
stateless ``rpc_forward`` of the span's whole input history (never the user's session), whose outputs at the
checked positions are compared with what the checked server returned. A disagreement beyond the tolerance of the
two servers' dtypes is settled by a third server when one exists: the outlier is the suspect.

Pure parts (tested without a swarm): :func:`relative_error`, :func:`tolerance_for`, :func:`adjudicate`,
:class:`SamplingPolicy`. :class:`SpotChecker` is the machinery: ``offer()`` runs in the generation thread (one
random draw; a sampled step's tensors are queued, or dropped when the bounded queue is full: a check never slows
a stream) and one worker thread runs the checks and hands each :class:`CheckResult` to ``on_result`` (the
coordinator persists it and applies the consequences: services/coordinator/checks.py).
"""

from __future__ import annotations

import queue
import random
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from services.common.logs import get_logger
from services.common.states import SpotCheckOutcome
from services.coordinator import metrics

log = get_logger(__name__)

# Tolerance on relative_error(), calibrated by bench/calibrate_tolerance.py (docs/verification.md "Calibration of
# the tolerance"): the largest honest disagreement measured (SmolLM2-135M spans with Petals' block on CPU:
# incremental vs stateless, chunked prefill, batched, thread counts) was, between servers of the same dtype,
# float32 4.2e-6, float16 3.6e-3, bfloat16 2.7e-2, and between a half-precision server and a float32 one float16
# 1.0e-2, bfloat16 9.6e-2 (at the first position). Each tolerance is ~4-6x that maximum (24x for float32, for GPU
# kernels), the mixed bfloat16 one 3x: a server that skips its blocks errs by >= 0.50, 5 % noise by ~5e-2.
TOLERANCES = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}  # every server of the check in this dtype
MIXED_TOLERANCES = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 3e-1}  # servers of different dtypes: the coarsest
DEFAULT_TOLERANCE = MIXED_TOLERANCES["bfloat16"]  # an unknown dtype: the loosest


def tolerance_for(*dtypes: Optional[str]) -> float:
    """The tolerance of a comparison between servers of these dtypes: the coarsest dtype's, from
    ``TOLERANCES`` when they all compute in the same dtype, else from ``MIXED_TOLERANCES``."""
    names = [str(dtype or "").replace("torch.", "") for dtype in dtypes]
    if not names or any(name not in TOLERANCES for name in names):
        return DEFAULT_TOLERANCE
    coarsest = max(names, key=list(TOLERANCES).index)
    return (TOLERANCES if len(set(names)) == 1 else MIXED_TOLERANCES)[coarsest]


def relative_error(a, b) -> float:
    """max over positions of ||a - b||_2 / ||b||_2 (hidden states [batch, positions, hidden], compared in float32).
    Per position, so one corrupted position in a long prefill is not averaged away."""
    import torch

    a = a.detach().to(torch.float32).reshape(-1, a.shape[-1])
    b = b.detach().to(torch.float32).reshape(-1, b.shape[-1])
    if a.shape != b.shape:
        return float("inf")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    norms = torch.linalg.vector_norm(b, dim=-1).clamp_min(1e-6)
    return float((torch.linalg.vector_norm(a - b, dim=-1) / norms).max())


PASSED, FAILED, VERIFIER_FAILED, INCONCLUSIVE = (SpotCheckOutcome.PASSED, SpotCheckOutcome.FAILED,
                                                  SpotCheckOutcome.VERIFIER_FAILED, SpotCheckOutcome.INCONCLUSIVE)


@dataclass(frozen=True)
class Verdict:
    outcome: SpotCheckOutcome
    suspect: Optional[str]  # "checked" | "verifier" | None
    error: float  # checked vs verifier
    referee_checked: Optional[float] = None
    referee_verifier: Optional[float] = None


def adjudicate(checked, verifier, referee, tolerance: float) -> Verdict:
    """Compare the checked server's outputs with the verifier's; on disagreement, with a third server's (or
    ``referee=None``): the one that disagrees with the two others is the suspect."""
    error = relative_error(checked, verifier)
    if error <= tolerance:
        return Verdict(PASSED, None, error)
    if referee is None:
        return Verdict(INCONCLUSIVE, None, error)
    to_checked, to_verifier = relative_error(checked, referee), relative_error(verifier, referee)
    if to_verifier <= tolerance < to_checked:
        return Verdict(FAILED, "checked", error, to_checked, to_verifier)
    if to_checked <= tolerance < to_verifier:
        return Verdict(VERIFIER_FAILED, "verifier", error, to_checked, to_verifier)
    return Verdict(INCONCLUSIVE, None, error, to_checked, to_verifier)


@dataclass
class SamplingPolicy:
    """Which steps are checked: each server step with probability ``rate``; a server with fewer than
    ``clean_record`` passed checks (new, or after a failure) with ``new_node_rate``."""

    rate: float = 0.03
    new_node_rate: float = 0.25
    clean_record: int = 20
    passed: dict = field(default_factory=dict)  # peer_id -> passed checks since its last failure
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def rate_for(self, peer_id: str) -> float:
        if self.rate <= 0:
            return 0.0
        return self.rate if self.passed.get(peer_id, 0) >= self.clean_record else max(self.rate, self.new_node_rate)

    def record(self, peer_id: str, passed: bool) -> None:
        with self._lock:
            self.passed[peer_id] = self.passed.get(peer_id, 0) + 1 if passed else 0


@dataclass
class CheckJob:
    model_id: str
    session_id: Optional[str]
    peer_id: str
    start: int
    end: int
    history: object  # torch.Tensor [1, L, hidden]: the span's inputs of every position so far
    outputs: object  # torch.Tensor [1, n, hidden]: what the checked server returned for the last n positions
    dtype: Optional[str]
    avoid: Optional[set] = None  # the stream's avoid set (petals_adapter.observe): a failed check adds the suspect


@dataclass(frozen=True)
class CheckResult:
    job: CheckJob
    verdict: Verdict
    verifier: str
    referee: Optional[str]
    tolerance: float
    dtype: str

    @property
    def suspect_peer(self) -> Optional[str]:
        return {"checked": self.job.peer_id, "verifier": self.verifier}.get(self.verdict.suspect)


class SwarmForward:
    """Stateless forwards of a span on a chosen server, through a model's Petals sequence manager."""

    def __init__(self, manager):
        self.manager = manager

    def candidates(self, start: int, end: int, exclude: set) -> list[tuple[str, Optional[str]]]:
        """(peer_id, torch_dtype) of routable servers holding all of [start, end), not in ``exclude``."""
        manager = self.manager
        with manager.lock_changes:
            info = manager.state.sequence_info
            if not info.spans_containing_block or start >= len(info.spans_containing_block):
                return []
            banned = manager.state.banned_peers
            found = []
            for span in info.spans_containing_block[start]:
                peer = span.peer_id.to_base58()
                if span.start <= start and span.end >= end and peer not in exclude and span.peer_id not in banned:
                    found.append((peer, getattr(span.server_info, "torch_dtype", None)))
        return sorted(set(found))

    def dtype_of(self, peer_id: str, block: int) -> Optional[str]:
        from hivemind import PeerID

        with self.manager.lock_changes:
            infos = self.manager.state.sequence_info.block_infos
            if block >= len(infos):
                return None
            server = infos[block].servers.get(PeerID.from_base58(peer_id))
        return getattr(server, "torch_dtype", None)

    def forward(self, peer_id: str, start: int, end: int, hidden, timeout: float):
        from hivemind import MSGPackSerializer, PeerID
        from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
        from petals.client.remote_forward_backward import run_remote_forward
        from petals.data_structures import CHAIN_DELIMITER
        from petals.server.handler import TransformerConnectionHandler
        from petals.utils.misc import DUMMY
        from petals.utils.packaging import pack_args_kwargs

        manager = self.manager
        stub = TransformerConnectionHandler.get_stub(manager.state.p2p, PeerID.from_base58(peer_id))
        flat, args_structure = pack_args_kwargs(hidden, DUMMY)
        uids = CHAIN_DELIMITER.join(manager.block_uids[start:end])
        metadata = manager.get_request_metadata("rpc_forward", args_structure, uids, *flat)
        future = RemoteExpertWorker.run_coroutine(
            run_remote_forward(uids, stub, manager.rpc_info, *flat, config=manager.config,
                               metadata=MSGPackSerializer.dumps(metadata)), return_future=True)
        (outputs,) = future.result(timeout=timeout)
        return outputs


class SpotChecker:
    """Samples server steps of a model's generations and checks them in one background thread."""

    def __init__(self, model_id: str, forward: SwarmForward, policy: SamplingPolicy,
                 on_result: Callable[[CheckResult], None], *, max_queue: int = 32, timeout_s: float = 30.0,
                 seed: Optional[int] = None):
        self.model_id = model_id
        self.forward = forward
        self.policy = policy
        self.on_result = on_result
        self.timeout_s = timeout_s
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.random = random.Random(seed)
        self.quarantined: set = set()  # peer ids never used as verifier or referee
        self.counters = dict.fromkeys(("offered", "sampled", "dropped", "no_verifier", "errors", PASSED, FAILED,
                                       VERIFIER_FAILED, INCONCLUSIVE), 0)
        self.max_honest_error = 0.0  # the largest error of a passed check (calibration, false-positive margin)
        self._stop = threading.Event()
        self._busy = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- the stream's side (generation thread): one random draw, maybe a queue put, never a wait --------------
    def offer(self, server_session, outputs, *, session_id: Optional[str], avoid: Optional[set]) -> bool:
        span = server_session.span
        peer_id = span.peer_id.to_base58()
        self.counters["offered"] += 1
        if self.random.random() >= self.policy.rate_for(peer_id):
            return False
        self.counters["sampled"] += 1
        job = CheckJob(self.model_id, session_id, peer_id, span.start, span.end, server_session.history,
                       outputs, getattr(span.server_info, "torch_dtype", None), avoid)
        try:  # history and outputs are fresh tensors per step (torch.cat / deserialized): no copy needed
            self.queue.put_nowait(job)
        except queue.Full:
            self.counters["dropped"] += 1
            metrics.SPOT_CHECKS_DROPPED.labels(self.model_id).inc()
            return False
        metrics.SPOT_CHECKS_PENDING.labels(self.model_id).inc()
        return True

    # -- the worker ------------------------------------------------------------------------------------------
    def start(self) -> "SpotChecker":
        self._thread = threading.Thread(target=self._run, name=f"spot-checks-{self.model_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def idle(self) -> bool:
        return self.queue.empty() and not self._busy.is_set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self._busy.set()
            try:
                result = self.check(job)
                if result is not None:
                    self.on_result(result)
            except Exception as error:  # noqa: BLE001 - a check that cannot run is no verdict on anyone
                self.counters["errors"] += 1
                log.warning("spot check could not run", peer_id=job.peer_id, blocks=f"{job.start}:{job.end}",
                            error=repr(error))
            finally:
                self._busy.clear()
                metrics.SPOT_CHECKS_PENDING.labels(self.model_id).dec()

    def check(self, job: CheckJob) -> Optional[CheckResult]:
        """Run one check (blocking): verifier forward, and a referee forward on disagreement."""
        exclude = {job.peer_id} | self.quarantined
        candidates = self.forward.candidates(job.start, job.end, exclude)
        if not candidates:
            self.counters["no_verifier"] += 1
            return None
        order = self.random.sample(candidates, len(candidates))
        (verifier, verifier_dtype), rest = order[0], order[1:]
        checked_dtype = job.dtype or self.forward.dtype_of(job.peer_id, job.start)
        n = job.outputs.shape[1]
        expected = self.forward.forward(verifier, job.start, job.end, job.history, self.timeout_s)[:, -n:]
        tolerance = tolerance_for(checked_dtype, verifier_dtype)
        referee, referee_out = None, None
        verdict = adjudicate(job.outputs, expected, None, tolerance)
        if verdict.outcome == INCONCLUSIVE and rest:
            referee, referee_dtype = rest[0]
            tolerance = tolerance_for(checked_dtype, verifier_dtype, referee_dtype)
            referee_out = self.forward.forward(referee, job.start, job.end, job.history, self.timeout_s)[:, -n:]
            verdict = adjudicate(job.outputs, expected, referee_out, tolerance)
        self.counters[verdict.outcome] += 1
        if verdict.outcome == PASSED:
            self.max_honest_error = max(self.max_honest_error, verdict.error)
        result = CheckResult(job, verdict, verifier, referee, tolerance, str(checked_dtype or "unknown"))
        suspect = result.suspect_peer
        if verdict.outcome == PASSED:
            self.policy.record(job.peer_id, True)
        elif suspect is not None:
            self.policy.record(suspect, False)
            if suspect == job.peer_id and job.avoid is not None:
                job.avoid.add(suspect)  # the rest of this stream avoids it (petals_adapter.observe(avoid=...))
        return result

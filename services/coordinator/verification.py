"""Spot checks by redundant execution (docs/verification.md).

A sample of server steps is re-run, off the stream's path, on a *different* server that serves the same blocks:
an inference session whose first step is the span's whole input history (``rpc_inference``, exactly what a user's
stream sends a server taking over its blocks, so a check cannot be told from traffic), whose outputs at the checked
positions are compared with what the checked server returned. Verifiers are registered servers with a clean record
on other wallets; a disagreement beyond the tolerance of the servers' dtypes is settled by the trusted verifier (the
coordinator recomputing the span from its own copy of the model, :class:`LocalSpanVerifier`), else by a referee on
a third wallet, else it stays inconclusive (held, settled later).

Pure parts (tested without a swarm): :func:`relative_error`, :func:`tolerance_for`, :func:`adjudicate`,
:class:`SamplingPolicy`, :meth:`SpotChecker.eligible`. :class:`SpotChecker` is the machinery: ``offer()`` runs in
the generation thread (one random draw; a sampled step's tensors are queued, or dropped when the bounded queue is
full: a check never slows a stream) and one worker thread runs the checks and hands each :class:`CheckResult` to
``on_result`` (the coordinator persists it and applies the consequences: services/coordinator/checks.py).
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import deque
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

    def is_clean(self, peer_id: str) -> bool:
        """At least ``clean_record`` passed checks since its last failure: trusted enough to verify others."""
        return self.passed.get(peer_id, 0) >= self.clean_record


# The name a check records for the coordinator's own recomputation (the trusted verifier).
TRUSTED_VERIFIER = "trusted:coordinator"


@dataclass(frozen=True)
class Reference:
    """The trusted verifier's outputs at the checked positions: the coordinator's own recomputation, or an
    operator-run server's (SPOT_CHECK_TRUSTED_PEERS)."""

    outputs: object
    dtype: Optional[str]
    name: str


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
    held: bool = False  # an inconclusive check being settled again (its contribution is held unpaid)


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
    """A span's outputs on a chosen server, through a model's Petals sequence manager. A check is sent as an
    inference session whose first step carries the whole prefix (``rpc_inference``): byte for byte what a user's
    stream sends to a server that takes over its blocks, so a server cannot tell a check from traffic."""

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

    def _server_info(self, peer_id: str, block: int):
        from hivemind import PeerID

        with self.manager.lock_changes:
            infos = self.manager.state.sequence_info.block_infos
            if block >= len(infos):
                return None
            return infos[block].servers.get(PeerID.from_base58(peer_id))

    def dtype_of(self, peer_id: str, block: int) -> Optional[str]:
        return getattr(self._server_info(peer_id, block), "torch_dtype", None)

    def forward(self, peer_id: str, start: int, end: int, hidden, timeout: float):
        import uuid

        from hivemind import PeerID
        from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
        from petals.client.inference_session import _ServerInferenceSession
        from petals.data_structures import CHAIN_DELIMITER, RemoteSpanInfo
        from petals.utils.misc import DUMMY, DUMMY_INT64

        manager = self.manager
        span = RemoteSpanInfo(peer_id=PeerID.from_base58(peer_id), start=start, end=end,
                              server_info=self._server_info(peer_id, start))
        uids = CHAIN_DELIMITER.join(manager.block_uids[start:end])
        metadata = manager.get_request_metadata("rpc_inference", uids, peer_id=span.peer_id)
        # a user's max_length is its prompt plus max_tokens: room for a continuation, like a stream's
        max_length = hidden.shape[1] + self.random_continuation()
        session = RemoteExpertWorker.run_coroutine(_ServerInferenceSession.create(
            manager.config, manager.state.p2p, span, uids, rpc_info=manager.rpc_info, max_length=max_length,
            **metadata), return_future=True).result(timeout=timeout)
        with session:
            return session.step(hidden, DUMMY, DUMMY_INT64, step_id=str(uuid.uuid4()))

    @staticmethod
    def random_continuation() -> int:
        return random.choice((16, 32, 64, 128, 256, 512))


class LocalSpanVerifier:
    """The trusted verifier: the coordinator recomputes a span itself, from its own copy of the model's files (the
    block a Petals server runs, ``load_pretrained_block``, in float32), loading blocks on demand and keeping at most
    ``max_bytes`` of them. Its output is the reference that settles a disagreement between strangers, and it
    checks the spans no second server holds."""

    name = TRUSTED_VERIFIER
    dtype = "float32"

    def __init__(self, model_path: str, config, max_bytes: int):
        from collections import OrderedDict

        self.model_path = model_path
        self.config = config
        self.max_bytes = max_bytes
        self.blocks: "OrderedDict[int, object]" = OrderedDict()
        self.block_bytes: Optional[int] = None
        self._lock = threading.Lock()

    def can_hold(self, start: int, end: int) -> bool:
        if self.max_bytes <= 0:
            return False
        if self.block_bytes is None:
            try:
                with self._lock:
                    self._block(start)
            except Exception as error:  # noqa: BLE001 - no local weights: no trusted verifier, said once
                log.warning("the coordinator cannot recompute spans (no trusted verifier)", error=repr(error))
                self.max_bytes = 0
                return False
        return (end - start) * self.block_bytes <= self.max_bytes

    def _block(self, index: int):
        block = self.blocks.get(index)
        if block is not None:
            self.blocks.move_to_end(index)
            return block
        import torch
        from petals.server.from_pretrained import load_pretrained_block

        block = load_pretrained_block(self.model_path, index, config=self.config, torch_dtype=torch.float32).eval()
        self.block_bytes = sum(p.numel() * p.element_size() for p in block.parameters())
        self.blocks[index] = block
        while len(self.blocks) > 1 and len(self.blocks) * self.block_bytes > self.max_bytes:
            self.blocks.popitem(last=False)
        return block

    def forward(self, start: int, end: int, hidden):
        import torch

        with self._lock, torch.inference_mode():
            out = hidden.to(torch.float32)
            for index in range(start, end):
                out = self._block(index)(out)[0]
        return out


class SpotChecker:
    """Samples server steps of a model's generations and checks them in one background thread.

    Who may verify: only registered servers (``registry``: peer -> wallet) with a clean record, not quarantined, on
    a wallet other than the checked server's (and a referee on a third wallet). A disagreement is settled by the
    trusted verifier when it can hold the span; it also checks the spans no eligible server holds. Without it a
    referee settles, and without a referee the check is inconclusive: held, and settled again later."""

    def __init__(self, model_id: str, forward: SwarmForward, policy: SamplingPolicy,
                 on_result: Callable[[CheckResult], None], *, max_queue: int = 32, timeout_s: float = 30.0,
                 seed: Optional[int] = None, trusted: Optional[LocalSpanVerifier] = None,
                 trusted_peers: frozenset = frozenset(), retry_s: float = 30.0, max_unsettled: int = 256):
        self.model_id = model_id
        self.forward = forward
        self.policy = policy
        self.on_result = on_result
        self.timeout_s = timeout_s
        self.trusted = trusted
        self.trusted_peers = frozenset(trusted_peers)  # operator-run servers whose outputs are a reference
        self.retry_s = retry_s
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.unsettled: "deque[CheckJob]" = deque(maxlen=max_unsettled)  # inconclusive checks to settle again
        self.random = random.Random(seed)
        self.quarantined: set = set()  # peer ids never used as verifier or referee
        self.registry: dict = {}  # peer id -> wallet (lower case) of registered nodes: who may verify
        self.counters = dict.fromkeys(("offered", "sampled", "dropped", "no_verifier", "errors", PASSED, FAILED,
                                       VERIFIER_FAILED, INCONCLUSIVE), 0)
        self.max_honest_error = 0.0  # the largest error of a passed check (calibration, false-positive margin)
        self._stop = threading.Event()
        self._busy = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last_retry = time.monotonic()

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
                self._settle_unsettled()
                continue
            self._busy.set()
            try:
                self._check_and_report(job)
            finally:
                self._busy.clear()
                metrics.SPOT_CHECKS_PENDING.labels(self.model_id).dec()

    def _check_and_report(self, job: CheckJob) -> None:
        try:
            results = self.check(job)
            inconclusive = any(r.verdict.outcome == INCONCLUSIVE for r in results)
            if job.held and inconclusive:
                self.unsettled.append(job)  # still unsettled: held, tried again later (not recorded twice)
                return
            for result in results:
                self.on_result(result)
            if inconclusive:
                job.held = True
                self.unsettled.append(job)
        except Exception as error:  # noqa: BLE001 - a check that cannot run is no verdict on anyone
            self.counters["errors"] += 1
            log.warning("spot check could not run", peer_id=job.peer_id, blocks=f"{job.start}:{job.end}",
                        error=repr(error))
            if job.held:
                self.unsettled.append(job)

    def _settle_unsettled(self) -> None:
        """Every ``retry_s``, try the inconclusive checks again (a referee or the trusted verifier may be back)."""
        if not self.unsettled or time.monotonic() - self._last_retry < self.retry_s:
            return
        self._last_retry = time.monotonic()
        for _ in range(len(self.unsettled)):
            if self._stop.is_set() or not self.queue.empty():
                return  # new checks first
            self._check_and_report(self.unsettled.popleft())

    # -- one check -------------------------------------------------------------------------------------------
    def eligible(self, candidates: list, checked_peer: str) -> list[tuple[str, Optional[str], str]]:
        """(peer, dtype, wallet) of the candidates that may verify ``checked_peer``: registered, clean record, not
        quarantined, on another wallet than the checked server's."""
        checked_wallet = self.registry.get(checked_peer)
        found = []
        for peer, dtype in candidates:
            wallet = self.registry.get(peer)
            if (wallet is None or peer in self.quarantined or not self.policy.is_clean(peer)
                    or wallet == checked_wallet or peer in self.trusted_peers):
                continue
            found.append((peer, dtype, wallet))
        return found

    def _trusted_output(self, job: CheckJob) -> Optional[Reference]:
        """The trusted verifier's outputs at the checked positions: the coordinator's recomputation when it can
        hold the span, else an operator-run trusted server holding it; None when neither can."""
        if self.trusted is not None and self.trusted.can_hold(job.start, job.end):
            try:
                outputs = self.trusted.forward(job.start, job.end, job.history)[:, -job.outputs.shape[1]:]
                return Reference(outputs, self.trusted.dtype, self.trusted.name)
            except Exception as error:  # noqa: BLE001 - then a trusted server, a referee, or the check is held
                log.warning("the trusted verifier could not recompute a span", blocks=f"{job.start}:{job.end}",
                            error=repr(error))
        if self.trusted_peers:
            for peer, dtype in self.forward.candidates(job.start, job.end, {job.peer_id}):
                if peer in self.trusted_peers:
                    outputs = self._server_output(peer, job)
                    if outputs is not None:
                        return Reference(outputs, dtype, peer)
        return None

    def check(self, job: CheckJob) -> list[CheckResult]:
        """Run one check (blocking); [] when nobody could check the span. One result, or two when the trusted
        verifier finds both the checked server and its verifier wrong."""
        checked_dtype = job.dtype or self.forward.dtype_of(job.peer_id, job.start)
        dtype = str(checked_dtype or "unknown")
        pool = self.eligible(self.forward.candidates(job.start, job.end, {job.peer_id} | self.quarantined),
                             job.peer_id)
        order = self.random.sample(pool, len(pool))
        if not order:
            expected = self._trusted_output(job)
            if expected is None:
                self.counters["no_verifier"] += 1
                return []
            return self._finish(job, [self._checked_by_trusted(job, expected, checked_dtype, dtype)])
        (verifier, verifier_dtype, verifier_wallet), rest = order[0], order[1:]
        found = self._server_output(verifier, job)
        tolerance = tolerance_for(checked_dtype, verifier_dtype)
        if found is None:  # the verifier did not answer: the trusted verifier checks, else the check is held
            expected = self._trusted_output(job)
            if expected is not None:
                return self._finish(job, [self._checked_by_trusted(job, expected, checked_dtype, dtype)])
            verdict = Verdict(INCONCLUSIVE, None, float("inf"))
            return self._finish(job, [CheckResult(job, verdict, verifier, None, tolerance, dtype)])
        verdict = adjudicate(job.outputs, found, None, tolerance)
        if verdict.outcome == PASSED:
            return self._finish(job, [CheckResult(job, verdict, verifier, None, tolerance, dtype)])
        expected = self._trusted_output(job)
        if expected is not None:
            tolerance = tolerance_for(checked_dtype, verifier_dtype, expected.dtype)
            return self._finish(job, self._settled_by_trusted(job, found, expected, verifier, tolerance, dtype))
        referee = next(((peer, d) for peer, d, wallet in rest if wallet != verifier_wallet), None)
        if referee is not None:
            tolerance = tolerance_for(checked_dtype, verifier_dtype, referee[1])
            referee_out = self._server_output(referee[0], job)
            if referee_out is not None:
                verdict = adjudicate(job.outputs, found, referee_out, tolerance)
        return self._finish(job, [CheckResult(job, verdict, verifier, referee and referee[0], tolerance, dtype)])

    def _server_output(self, peer_id: str, job: CheckJob):
        """A server's outputs at the checked positions, or None when it does not answer (no verdict on anyone)."""
        try:
            outputs = self.forward.forward(peer_id, job.start, job.end, job.history, self.timeout_s)
        except Exception as error:  # noqa: BLE001 - a verifier that fails to answer proves nothing either way
            log.warning("a verifier did not answer a spot check", verifier=peer_id, blocks=f"{job.start}:{job.end}",
                        error=repr(error))
            return None
        return outputs[:, -job.outputs.shape[1]:]

    @staticmethod
    def _checked_by_trusted(job: CheckJob, expected: Reference, checked_dtype, dtype: str) -> CheckResult:
        """The trusted verifier is the verifier: its output is the reference."""
        tolerance = tolerance_for(checked_dtype, expected.dtype)
        error = relative_error(job.outputs, expected.outputs)
        verdict = Verdict(PASSED, None, error) if error <= tolerance else Verdict(FAILED, "checked", error, error)
        return CheckResult(job, verdict, expected.name, None, tolerance, dtype)

    @staticmethod
    def _settled_by_trusted(job: CheckJob, found, expected: Reference, verifier: str, tolerance: float,
                            dtype: str) -> list[CheckResult]:
        """The checked server and its verifier disagree: each is judged against the trusted verifier's output."""
        error = relative_error(job.outputs, found)
        to_checked = relative_error(job.outputs, expected.outputs)
        to_verifier = relative_error(found, expected.outputs)
        results = []
        if to_checked > tolerance:
            results.append(Verdict(FAILED, "checked", error, to_checked, to_verifier))
        if to_verifier > tolerance:  # a verifier contradicted by the reference is itself a suspect
            results.append(Verdict(VERIFIER_FAILED, "verifier", error, to_checked, to_verifier))
        if not results:  # both within the tolerance of the reference: the checked server did its work
            results.append(Verdict(PASSED, None, error, to_checked, to_verifier))
        return [CheckResult(job, verdict, verifier, expected.name, tolerance, dtype) for verdict in results]

    def _finish(self, job: CheckJob, results: list[CheckResult]) -> list[CheckResult]:
        for result in results:
            verdict = result.verdict
            self.counters[verdict.outcome] += 1
            suspect = result.suspect_peer
            if verdict.outcome == PASSED:
                honest_error = verdict.error if verdict.referee_checked is None else verdict.referee_checked
                self.max_honest_error = max(self.max_honest_error, honest_error)
                self.policy.record(job.peer_id, True)
            elif suspect is not None:
                self.policy.record(suspect, False)
                if suspect == job.peer_id and job.avoid is not None:
                    job.avoid.add(suspect)  # the rest of this stream avoids it (petals_adapter.observe(avoid=...))
        return results

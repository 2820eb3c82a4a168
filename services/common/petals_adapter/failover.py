"""Our failover behaviour on the Petals client: how a stream survives a server that dies, hangs or is distrusted.

These change Petals' client (they are applied, like the fixes, by ``services.common.petals_adapter`` on import
and listed in its ``FIXES``), but they are our behaviour rather than upstream's: a failed server leaves the
routes at once, its replacement replays the processed prefix, a step has a latency budget, and a step whose
blocks no live server holds fails at once with ``SwarmUnavailable``. The hooks the step calls (metering,
failover reports, spot checks, peers to avoid) are set through session.py.

``fast_route_repair``
    After a server fails, ``RemoteSequenceManager.on_request_failure`` removes it from ``block_infos`` but not
    from the derived ``spans_containing_block`` the router reads, and a failure while *connecting* to a server
    bans nobody; so the next route picks the dead server again, and again, with growing backoff (~15 s stall)
    until the periodic refresh. The derived spans are now recomputed on failure, and a server that fails to
    accept a session is reported as failed, so the first retry (no delay) already takes a live replica.
``failover_replay`` (an upstream bug, docs/install.md)
    After a server dies, petals gives the replacement server session the old ``history`` but ``_position=0``,
    so every replay fails with ``AssertionError("Broken input cache ...")`` and the client retries forever.
    Fixed ``InferenceSession.step``: a fresh (replacement) server session is sent the already-processed
    prefix plus the current tokens, so it rebuilds its attention cache, and only the current positions flow
    on to servers that still hold their caches. Output is identical to an uninterrupted run.
``step_latency_budget`` (a frozen server stalled the stream for the whole ``request_timeout``)
    A server that hangs (SIGSTOP, GPU hang, swap storm, its network silently dropped) keeps its connection and
    never answers; upstream only ``request_timeout`` notices. Each step now has a deadline from that server's
    own recent step times: ``max(floor_s, factor x p99)`` of its last 64 steps (shared by all sessions of the
    process; a sample of n positions counts as n/m times one of m positions when it is larger, so a long
    prefill or replay gets a proportionally longer budget). When it passes and another live server can take
    those blocks, the step is abandoned with ``StepDeadlineExceeded`` and the failover path bans the server
    (Petals' blacklist: 15 s, doubling on repeated failures, cleared by a success; it returns to the routes at
    the next refresh after the ban) and replays on the replica. Without an alternative it keeps waiting (up to
    ``request_timeout``): a slow server is better than none. A server with no recorded step yet (its first
    step in this process) has only ``request_timeout``. Settings: ``configure_step_budget(manager, factor,
    floor_s)`` (the coordinator's PETALS_STEP_BUDGET_FACTOR / PETALS_STEP_BUDGET_FLOOR_S; factor 0 = off).

``SwarmUnavailable``: when a server died or hung and no other live server holds its blocks (none routable and
none ONLINE in a fresh DHT read, banned peers excluded), the step raises it at once ("blocks 2:4: no live
server") instead of retrying the dead server with backoff. A server that *refused* (answered with an error) is
retried as upstream. ``PeerDistrusted``: a server session on a peer of the session's ``avoid`` set (session.py)
is dropped before its next step, like a failed server (cause ``distrusted``), when another live server holds its
blocks.
"""

from __future__ import annotations

import operator
import threading

from services.common.petals_adapter.session import hooks_of


def _fix_fast_route_repair() -> None:
    from petals.client.routing import sequence_manager as sm
    from petals.client.routing.sequence_info import RemoteSequenceInfo

    original_on_failure = sm.RemoteSequenceManager.on_request_failure

    def on_request_failure(self, peer_id):
        original_on_failure(self, peer_id)
        if peer_id is None:
            return
        with self.lock_changes:  # keep the router's derived view consistent with block_infos
            info = self.state.sequence_info
            info.spans_by_priority, info.spans_containing_block = RemoteSequenceInfo._sort_spans(info.block_infos)

    sm.RemoteSequenceManager.on_request_failure = on_request_failure
    # the other half (a server that refuses a session is reported) is in patch_server_sessions


class SwarmUnavailable(RuntimeError):
    """No live server holds some blocks of the model: the generation cannot go on."""

    def __init__(self, start: int, end: int):
        super().__init__(f"blocks {start}:{end}: no live server")
        self.start, self.end = start, end


class PeerDistrusted(RuntimeError):
    """The session drops a server that failed a spot check (``InferenceSession.avoid_peers``)."""


def failure_cause(error: BaseException) -> str:
    """died (the connection or stream broke, the peer cannot be dialed), hung (no answer in time: the step
    budget or request_timeout), refused (the server answered with an error, or would not open a session),
    distrusted (it failed a spot check: the session drops it)."""
    from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError

    if isinstance(error, PeerDistrusted):
        return "distrusted"
    if isinstance(error, TimeoutError):  # StepDeadlineExceeded, asyncio.TimeoutError (3.11+)
        return "hung"
    if isinstance(error, P2PHandlerError):
        return "refused"
    if isinstance(error, (ConnectionError, EOFError, StopAsyncIteration, P2PDaemonError)):
        return "died"
    return "refused"


def no_live_server(manager, start: int, end: int) -> bool:
    """True when some block in [start, end) has no server that could take it: none routable now and none ONLINE
    in a fresh read of the DHT (banned peers do not count)."""
    from petals.data_structures import ServerState
    from petals.utils.dht import get_remote_module_infos

    with manager.lock_changes:
        banned = manager.state.banned_peers
        spans = manager.state.sequence_info.spans_containing_block
        if all(any(span.peer_id not in banned for span in spans[block]) for block in range(start, end)):
            return False
    try:
        infos = get_remote_module_infos(manager.dht, manager.block_uids[start:end],
                                        active_adapter=manager.config.active_adapter, latest=True)
    except Exception:
        return False  # cannot tell: let the retries decide
    return any(not any(info.state == ServerState.ONLINE and peer_id not in banned
                       for peer_id, info in block.servers.items()) for block in infos)


def _fix_failover_replay() -> None:
    from petals.client import inference_session as inf

    original_update_sequence = inf.InferenceSession._update_sequence

    def _update_sequence(self, server_idx: int, block_idx: int, attempt_no: int):
        """As upstream, but hand the replacement the *processed prefix* of the failed session's inputs."""
        failed = self._server_sessions[server_idx] if server_idx < len(self._server_sessions) else None
        prefix = None
        if failed is not None:
            if failed.history is not None and failed.history.shape[1] >= self._position:
                prefix = failed.history[:, : self._position]
            else:
                prefix = getattr(failed, "_far_mesh_replay_prefix", None)
        original_update_sequence(self, server_idx, block_idx, attempt_no)
        if failed is not None:
            replacement = self._server_sessions[server_idx]
            replacement.history = None  # upstream copies the old history here: the bug this fixes
            replacement._far_mesh_replay_prefix = prefix

    inf.InferenceSession._update_sequence = _update_sequence
    inf.InferenceSession.step = _replaying_step


def _replaying_step(self, inputs, prompts=None, hypo_ids=None):
    """``InferenceSession.step`` as upstream's, but a replacement server session is sent the processed prefix
    with the current positions, and the session's hooks see every step, failover and output."""
    import itertools
    import time
    import uuid

    import torch
    from petals.client.inference_session import logger
    from petals.client.routing import maybe_log_traceback

    assert not self._closed
    if torch.is_grad_enabled():
        logger.warning("Running inference session with grad enabled. Gradients will *not* be propagated correctly.")
    prompts, hypo_ids = _step_arguments(self, inputs, prompts, hypo_ids)
    inputs_device, inputs_dtype = inputs.device, inputs.dtype
    inputs, prompts, hypo_ids = inputs.cpu(), prompts.cpu(), hypo_ids.cpu()
    step_id = str(uuid.uuid4())
    prefix_len = self._position
    n_input_tokens = inputs.shape[1]
    if prefix_len + n_input_tokens > self._max_length:
        raise ValueError(
            f"Maximum length exceeded: prefix {prefix_len} + current {n_input_tokens} "
            f"exceeds pre-allocated maximum {self._max_length}"
        )
    hooks = hooks_of(self)  # set by session.observe(); read once per step
    observer, failover_observer = hooks.on_step, hooks.on_failover
    output_observer, avoid = hooks.on_span_output, hooks.avoid
    failed: list = []  # (peer_id, blocks, cause, error, attempt start) of this block's failed attempts

    hidden = inputs  # either the current positions only, or prefix + current after a replay upstream
    server_idx = block_idx = 0
    while block_idx < self.num_blocks:
        for attempt_no in itertools.count():
            server_session = None
            attempt_started = time.perf_counter()
            try:
                if not self._server_sessions or attempt_no >= 1:
                    self._update_sequence(server_idx, block_idx, attempt_no)
                server_session = self._server_sessions[server_idx]
                if (avoid and server_session.span.peer_id.to_base58() in avoid
                        and has_alternative(self._sequence_manager, server_session.span)):
                    raise PeerDistrusted(f"server {server_session.span.peer_id} failed a spot check")
                to_send = _inputs_to_send(server_session, hidden, prefix_len, n_input_tokens)
                span = server_session.span
                outputs = server_session.step(to_send, prompts[span.start : span.end], hypo_ids, step_id=step_id)
                if observer is not None:
                    observer(span, to_send.shape[1])
                if output_observer is not None:
                    output_observer(server_session, outputs)
                hidden = outputs
                server_idx += 1
                block_idx = span.end
                self._sequence_manager.on_request_success(span.peer_id)
                _report_failover(failover_observer, failed, span.peer_id.to_base58())
                failed = []
                break
            except Exception as e:
                self._sequence_manager.on_request_failure(
                    server_session.span.peer_id if server_session is not None else None
                )
                _record_failure(self._sequence_manager, server_session, e, failed, attempt_started,
                                failover_observer)
                if attempt_no + 1 == self._sequence_manager.config.max_retries:
                    raise
                delay = self._sequence_manager.get_retry_delay(attempt_no)
                logger.warning(
                    f"Caught exception when running inference via "
                    f"{server_session.span if server_session is not None else None} "
                    f"(retry in {delay:.0f} sec): {repr(e)}"
                )
                maybe_log_traceback(e)
                time.sleep(delay)

    self._position += n_input_tokens
    outputs = hidden[:, -n_input_tokens:]
    return outputs.to(device=inputs_device, dtype=inputs_dtype)


def _step_arguments(session, inputs, prompts, hypo_ids):
    """Upstream's checks of ``InferenceSession.step``'s ``prompts`` and ``hypo_ids``, and its placeholders for
    absent ones."""
    import torch
    from petals.utils.misc import DUMMY, DUMMY_INT64, is_dummy

    if prompts is None or is_dummy(prompts):
        prompts = DUMMY
    else:
        assert prompts.ndim == 4 and prompts.shape[0] == session.num_blocks
    if hypo_ids is None or is_dummy(hypo_ids):
        hypo_ids = DUMMY_INT64
    else:
        assert len(hypo_ids) == len(inputs) and hypo_ids.dtype == torch.int64
    return prompts, hypo_ids


def _inputs_to_send(server_session, hidden, prefix_len: int, n_input_tokens: int):
    """What a server session is sent this step: the current positions when it holds the attention cache of the
    prefix; else the prefix and the current positions, so a replacement rebuilds its cache (from the processed
    prefix its failed predecessor handed it, or from an upstream replay that already produced it)."""
    import torch

    current = hidden[:, -n_input_tokens:]
    if server_session.stepped or prefix_len == 0:
        return current  # the server holds the cache for [0, prefix_len)
    if hidden.shape[1] == prefix_len + n_input_tokens:
        return hidden  # an upstream replay already produced the full prefix
    replay = getattr(server_session, "_far_mesh_replay_prefix", None)
    if replay is None or replay.shape[1] != prefix_len:
        raise RuntimeError(f"cannot rebuild the attention cache of {server_session.span}")
    return torch.cat([replay, current], dim=1)


def _report_failover(failover_observer, failed: list, replaced_by) -> None:
    """Report each failed attempt of this block (``failed``) once it is settled: replaced by the peer
    ``replaced_by`` (the stall: from the first failed attempt until now), or by nobody (None)."""
    if not failed or failover_observer is None:
        return
    import time

    done = time.perf_counter()
    for peer_id, blocks, cause, error, started in failed:
        failover_observer(dict(peer_id=peer_id, blocks=blocks, cause=cause, error=error, replaced_by=replaced_by,
                               stall_s=done - started if replaced_by is not None else None))


def _record_failure(manager, server_session, error: Exception, failed: list, attempt_started: float,
                    failover_observer) -> None:
    """Add a failed attempt to ``failed`` (peer, blocks, cause, error, start of the first failed attempt); when it
    died or hung and no live server holds its blocks, report the failovers and raise ``SwarmUnavailable``."""
    failed_span = server_session.span if server_session is not None else getattr(
        error, "_far_mesh_span", None)  # a server that would not open a session (already reported)
    if failed_span is None:
        return
    cause = failure_cause(error)
    start, end = failed_span.start, failed_span.end
    failed.append((failed_span.peer_id.to_base58(), f"{start}:{end}", cause, repr(error),
                   failed[0][4] if failed else attempt_started))
    if cause != "refused" and no_live_server(manager, start, end):
        _report_failover(failover_observer, failed, None)
        raise SwarmUnavailable(start, end) from error


def _fix_lean_client_step() -> None:
    """Upstream's ``_ServerInferenceSession.step`` packs, describes and serializes all three tensors of a step on
    every hop, though two are always the same empty placeholders (no deep prompts, no beam reordering): with 8
    streams through 3 servers that is 24 times per round, in the coordinator's one GIL, where the convoy's steps
    queue (docs/batching.md). Such steps now reuse the placeholders' serialized form and the argument structure
    (made on the session's first step, as upstream makes them); the request is the same, byte for byte
    (tests/test_petals_adapter.py). Any other step (deep prompts, hypo_ids) takes upstream's path."""
    import torch
    from hivemind import MSGPackSerializer, deserialize_torch_tensor, serialize_torch_tensor
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from hivemind.proto import runtime_pb2
    from petals.client import inference_session as inf
    from petals.utils.misc import is_dummy
    from petals.utils.packaging import pack_args_kwargs

    original_step = inf._ServerInferenceSession.step

    def step(self, inputs: torch.Tensor, prompts: torch.Tensor, hypo_ids: torch.Tensor, *, step_id: str):
        if self.closed or not (is_dummy(prompts) and is_dummy(hypo_ids)):
            return original_step(self, inputs, prompts, hypo_ids, step_id=step_id)
        key = (tuple(prompts.shape), prompts.dtype, tuple(hypo_ids.shape), hypo_ids.dtype, inputs.dtype)
        cached = self.__dict__.get("_far_mesh_lean_step")
        if cached is None or cached[0] != key:
            _tensors, args_structure = pack_args_kwargs(inputs, prompts, hypo_ids)
            compression = self.rpc_info["inference_schema"][0][0].compression
            cached = (key, args_structure, compression,
                      (serialize_torch_tensor(prompts, compression), serialize_torch_tensor(hypo_ids, compression)))
            self._far_mesh_lean_step = cached
        _key, args_structure, compression, placeholders = cached

        n_input_tokens = inputs.shape[1]  # from here on as upstream
        if self.history is None:
            self.history = inputs
        elif self.history.shape[1] == self._position:
            self.history = torch.cat([self.history, inputs[:, -n_input_tokens:]], dim=1)
        assert self.history.shape[1] == self._position + n_input_tokens, (
            f"Broken input cache: span={self.span} shape={self.history.shape} "
            f"position={self._position} n_input_tokens={n_input_tokens}")
        inputs = self.history if not self.stepped else inputs[:, -n_input_tokens:]
        request_metadata = dict(session_id=self.session_id, step_id=step_id)
        if not self.stepped:
            request_metadata.update(self.session_metadata)
        elif self.config.use_server_to_server:
            next_servers = self._collect_next_servers()
            if next_servers:
                request_metadata["next_servers"] = next_servers
        request_metadata["args_structure"] = args_structure
        request = runtime_pb2.ExpertRequest(
            uid=self.uid, tensors=[serialize_torch_tensor(inputs, compression), *placeholders],
            metadata=MSGPackSerializer.dumps(request_metadata))
        outputs_serialized = RemoteExpertWorker.run_coroutine(self._step(request))
        outputs = list(map(deserialize_torch_tensor, outputs_serialized.tensors))
        assert outputs[0].shape == inputs.shape, (
            f"output activation shape is different from input shape: {outputs[0].shape} != {inputs.shape}")
        self._position += n_input_tokens
        return outputs[0]

    step._far_mesh_original = original_step
    inf._ServerInferenceSession.step = step


DEFAULT_STEP_BUDGET_FACTOR = 5.0
DEFAULT_STEP_BUDGET_FLOOR_S = 1.0
STEP_SAMPLES_PER_PEER = 64


class StepDeadlineExceeded(TimeoutError):
    """A server did not answer a step within its latency budget (it is frozen, or far slower than usual)."""


class StepLatency:
    """Recent step durations per server (peer ID), shared by every session of the process."""

    def __init__(self, window: int = STEP_SAMPLES_PER_PEER):
        import collections

        self._window = window
        self._samples: dict = collections.defaultdict(lambda: collections.deque(maxlen=self._window))
        self._lock = threading.Lock()

    def record(self, peer_id, seconds: float, positions: int) -> None:
        with self._lock:
            self._samples[str(peer_id)].append((seconds, max(1, positions)))

    def p99(self, peer_id, positions: int = 1):
        """The 99th percentile of recent step times, each scaled up to ``positions`` (never down); None if no
        step of this server was seen yet."""
        with self._lock:
            samples = self._samples.get(str(peer_id), ())
            if positions <= 1:  # every step (hop) of a decode: no sample scales, so sort the raw times, in C (this
                scaled = sorted(map(operator.itemgetter(0), samples))  # runs per hop, for every stream)
            else:
                scaled = sorted(seconds * max(1.0, positions / n) for seconds, n in samples)
        if not scaled:
            return None
        return scaled[min(len(scaled) - 1, int(0.99 * len(scaled)))]

    def median_decode(self, peer_id):
        """The median of recent one-position (decode) step times, as the client sees them (round trip included);
        None if no decode step of this server was seen yet."""
        with self._lock:
            times = sorted(seconds for seconds, n in self._samples.get(str(peer_id), ()) if n == 1)
        return times[len(times) // 2] if times else None

    def budget(self, peer_id, positions: int, factor: float, floor_s: float):
        p99 = self.p99(peer_id, positions)
        if p99 is None or factor <= 0:
            return None
        return max(floor_s, factor * p99)

    def clear(self) -> None:
        with self._lock:
            self._samples.clear()


STEP_LATENCY = StepLatency()


def configure_step_budget(manager, factor: float = DEFAULT_STEP_BUDGET_FACTOR,
                          floor_s: float = DEFAULT_STEP_BUDGET_FLOOR_S) -> None:
    """The step budget of one client (a ``RemoteSequenceManager``): ``max(floor_s, factor x p99)``; 0 = off."""
    manager._far_mesh_step_budget = (float(factor), float(floor_s))


def has_alternative(manager, span) -> bool:
    """Whether every block of ``span`` has another server that is routable now (not this peer, not banned)."""
    with manager.lock_changes:
        info = manager.state.sequence_info
        banned = manager.state.banned_peers
        for block in range(span.start, span.end):
            if not any(other.peer_id != span.peer_id and other.peer_id not in banned
                       for other in info.spans_containing_block[block]):
                return False
    return True


def patch_server_sessions(*, report_refusals: bool, step_budget: bool, closed_stream_error: bool) -> None:
    """Patch ``InferenceSession._enter_server_sessions`` and ``_ServerInferenceSession._step`` once each, with the
    parts of the enabled fixes that change them: ``fast_route_repair`` (``report_refusals``: a server that fails to
    open its session is reported, so the next route avoids it), ``step_latency_budget`` (``step_budget``: each
    server session knows its manager, and a step has a deadline) and ``dead_peer_stream``
    (``closed_stream_error``: a stream that ends mid-step raises ``ServerStreamClosed``)."""
    import asyncio

    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from petals.client import inference_session as inf
    from petals.data_structures import CHAIN_DELIMITER

    from services.common.petals_adapter.fixes import ServerStreamClosed

    def _enter_server_sessions(self, chosen_spans):
        """Upstream's loop, with the reports and the manager of the enabled fixes."""
        server_sessions = []
        try:
            for span in chosen_spans:
                span_uids = CHAIN_DELIMITER.join(self._sequence_manager.block_uids[span.start : span.end])
                metadata = self._sequence_manager.get_request_metadata("rpc_inference", span_uids, peer_id=span.peer_id)
                try:
                    session = RemoteExpertWorker.run_coroutine(
                        inf._ServerInferenceSession.create(
                            self._sequence_manager.config, self._sequence_manager.state.p2p, span, span_uids,
                            rpc_info=self._sequence_manager.rpc_info, max_length=self._max_length, **metadata,
                        )
                    )
                except Exception as error:
                    if report_refusals:
                        self._sequence_manager.on_request_failure(span.peer_id)
                        error._far_mesh_span = span  # the failover report names the server that refused
                    raise
                if step_budget:
                    session._far_mesh_manager = self._sequence_manager
                server_sessions.append(session)
                session.__enter__()
            return server_sessions
        except BaseException:
            self._exit_server_sessions(server_sessions)
            raise

    async def exchange(self, inputs_serialized):
        """Upstream's step: one request in, one response out."""
        await self._inputs_queue.put(inputs_serialized)
        self.stepped = True
        try:
            return await asyncio.wait_for(inf.anext(self._outputs_stream), self.config.request_timeout)
        except StopAsyncIteration:
            if not closed_stream_error:
                raise
            raise ServerStreamClosed(f"server {self.span.peer_id} closed the inference stream before answering "
                                     f"(it died or dropped the session)") from None

    if report_refusals or step_budget:
        inf.InferenceSession._enter_server_sessions = _enter_server_sessions
    if step_budget:
        inf._ServerInferenceSession._step = _budgeted(exchange)
    elif closed_stream_error:
        inf._ServerInferenceSession._step = exchange


def _budgeted(exchange):
    """``exchange`` under the step latency budget: given up with ``StepDeadlineExceeded`` after
    ``max(floor_s, factor x p99)`` of the server's recent steps when another live server holds its blocks."""
    import asyncio
    import time

    async def _step(self, request):
        manager = getattr(self, "_far_mesh_manager", None)
        factor, floor_s = getattr(manager, "_far_mesh_step_budget",
                                  (DEFAULT_STEP_BUDGET_FACTOR, DEFAULT_STEP_BUDGET_FLOOR_S))
        sizes = request.tensors[0].size if request is not None and request.tensors else ()
        positions = int(sizes[1]) if len(sizes) >= 2 else 1
        budget = STEP_LATENCY.budget(self.span.peer_id, positions, factor, floor_s)
        started = time.perf_counter()
        if manager is None or budget is None or budget >= self.config.request_timeout:
            response = await exchange(self, request)
        else:
            task = asyncio.ensure_future(exchange(self, request))
            while True:
                done, _ = await asyncio.wait({task}, timeout=budget)
                if done:
                    break
                if has_alternative(manager, self.span):
                    task.cancel()
                    await asyncio.wait({task})
                    p99 = STEP_LATENCY.p99(self.span.peer_id, positions)
                    raise StepDeadlineExceeded(
                        f"server {self.span.peer_id} did not answer a step of {positions} positions within its "
                        f"budget of {budget:.2f} s (max({floor_s:g} s, {factor:g} x its p99 {p99 * 1000:.0f} ms))")
                # nobody else serves these blocks: keep waiting (request_timeout still bounds the step)
            response = task.result()
        STEP_LATENCY.record(self.span.peer_id, time.perf_counter() - started, positions)
        return response

    return _step


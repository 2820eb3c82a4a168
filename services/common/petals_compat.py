"""Runtime fixes that make PyPI petals 2.2.0.post1 work on hivemind 1.1.12 / torch 2.13 (the pinned set).

Import this module before ``petals`` anywhere (``services.common.petals_compat.apply()`` is called on import,
and is idempotent). Every fix is listed in ``FIXES`` and has a test in ``tests/test_petals_compat.py`` that
fails when the fix is removed (``FAR_MESH_DISABLE_COMPAT_FIX=<name>`` turns a fix off for that test).

The fixes (see ../shared/SPEC.md "Petals on this stack"):

``hivemind_reexports``
    hivemind 1.1.12 dropped the top-level re-exports petals imports (``hivemind.PeerID``, ``P2P``,
    ``get_dht_time``, ``serialize_torch_tensor``, ``nested_*``, ``anext``, ...). We put them back.
``grad_scaler_location``
    hivemind < 1.1.12 imports ``OptState``/``_refresh_per_optimizer_state`` from ``torch.cuda.amp.grad_scaler``;
    they moved to ``torch.amp.grad_scaler``. hivemind 1.1.12 already looks in the new place, so this fix is a
    no-op on the pinned set and only aliases the names when the old module lacks them.
``no_upnp``
    ``P2P.create`` defaults to ``nat_port_map=True`` which makes p2pd probe the LAN for UPnP gateways. Forced off.
``hf_no_telemetry``
    ``HF_HUB_DISABLE_TELEMETRY=1``: downloads of hub models are allowed (real deployments name hub models), but
    nothing else is sent to the hub. Tests and the demo set ``HF_HUB_OFFLINE=1`` themselves (their models are
    built locally); an unreachable hub then fails with one clear line (services/models/hub.py).
``no_version_check``
    ``petals.cli.run_server`` queries PyPI for the latest version at start; replaced by a log line.
``quiet_session_del``
    ``_ServerInferenceSession.__del__``/``InferenceSession.__del__`` call ``close()`` which runs a coroutine on
    the RemoteExpertWorker event loop; at interpreter exit (or from that loop's own thread) this hangs. The
    destructors now never block: they close only when it is safe.
``task_cancel_from_any_thread``
    hivemind's ``cancel_task_if_running`` (used by ``P2P.__del__`` and the daemon client's destructors) calls
    ``asyncio.get_event_loop()`` in whatever thread the garbage collector runs, which raises "There is no
    current event loop in thread 'MainThread'" and leaks the task. It now cancels through the task's own
    loop, thread-safely.
``root_logger_untouched``
    importing petals installs hivemind's log handler on the *root* logger (``use_hivemind_log_handler(
    "in_root_logger")``), so every library's INFO lines come out in hivemind's format, twice when the process
    has its own handler. The handler is removed again; services.common.logs renders all records.
``fast_route_repair``
    After a server fails, ``RemoteSequenceManager.on_request_failure`` removes it from ``block_infos`` but not
    from the derived ``spans_containing_block`` the router reads, and a failure while *connecting* to a server
    bans nobody; so the next route picks the dead server again, and again, with growing backoff (~15 s stall)
    until the periodic refresh. The derived spans are now recomputed on failure, and a server that fails to
    accept a session is reported as failed, so the first retry (no delay) already takes a live replica.
``failover_replay`` (petals issue #587)
    After a server dies, petals gives the replacement server session the old ``history`` but ``_position=0``,
    so every replay fails with ``AssertionError("Broken input cache ...")`` and the client retries forever.
    Fixed ``InferenceSession.step``: a fresh (replacement) server session is sent the already-processed
    prefix plus the current tokens, so it rebuilds its attention cache, and only the current positions flow
    on to servers that still hold their caches. Output is identical to an uninterrupted run.
``dead_peer_stream`` (a server killed mid-step stalled the stream for the whole ``request_timeout``)
    When a server dies, its p2pd's TCP connection drops, our p2pd resets the libp2p stream and closes the unix
    socket of the call at once (~0.1 s on loopback). hivemind's ``_iterate_protobuf_stream_handler`` then sees
    EOF but, before ending the response stream, awaits its writer task, which is blocked waiting for the
    caller's *next* request (Petals feeds requests from a queue, one per step): the reader hangs until the
    caller's timeout (``request_timeout``, 30 s here). The writer is now cancelled when the peer has closed the
    stream while the writer only waits for more requests (the peer reads nothing more: hivemind's handler closes
    the stream once its responses end), so the response stream ends at once; and Petals' ``_ServerInferenceSession``
    turns that early end (``StopAsyncIteration`` mid-step) into ``ConnectionResetError("... closed the stream")``,
    which the failover path handles like any dead server.
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

It also adds hooks (not fixes) to the session step of ``failover_replay``:

- ``InferenceSession.step_observer``, called as ``observer(span: RemoteSpanInfo, positions: int)`` after every
  successful server step, including replays. The coordinator meters provider work with it.
- ``InferenceSession.failover_observer``, called with a ``dict`` for every server that failed a step:
  ``peer_id``, ``blocks`` ("2:4"), ``cause`` (``failure_cause``: died, hung or refused), ``error``,
  ``replaced_by`` (the peer that then served those blocks, or None) and ``stall_s`` (from the start of the
  failed attempt to the end of the step that replaced it).
- ``InferenceSession.span_output_observer``, called as ``observer(server_session, outputs)`` after every
  successful server step: ``server_session.history`` holds that span's inputs for every position so far (the
  current ones last) and ``outputs`` what the server returned for the positions it was sent. The coordinator's
  spot checks (services/coordinator/verification.py) sample it. It must be cheap: it runs on the stream's path.
- ``InferenceSession.avoid_peers``, a set of peer IDs (base58): a server session on one of them is dropped before
  its next step, like a failed server (cause ``distrusted``): it is banned and its blocks are replayed on another
  server, when another live server holds them (otherwise the session keeps it). A failed spot check adds the
  suspect here, so the rest of that stream avoids it.
- ``SwarmUnavailable``: when a server died or hung and no other live server holds its blocks (none routable
  and none ONLINE in a fresh DHT read, banned peers excluded), the step raises it at once
  ("blocks 2:4: no live server") instead of retrying the dead server with backoff. A server that *refused*
  (answered with an error) is retried as upstream.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from typing import Callable

FIXES = (
    "hivemind_reexports",
    "grad_scaler_location",
    "no_upnp",
    "hf_no_telemetry",
    "no_version_check",
    "quiet_session_del",
    "task_cancel_from_any_thread",
    "root_logger_untouched",
    "fast_route_repair",
    "failover_replay",
    "dead_peer_stream",
    "step_latency_budget",
)

_applied = False
_lock = threading.Lock()


def _enabled(name: str) -> bool:
    disabled = {item.strip() for item in os.environ.get("FAR_MESH_DISABLE_COMPAT_FIX", "").split(",")}
    return name not in disabled


def _fix_hf_no_telemetry() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _fix_grad_scaler_location() -> None:
    import torch.amp.grad_scaler as new_location

    try:
        import torch.cuda.amp.grad_scaler as old_location
    except ImportError:  # pragma: no cover - module removed entirely in a future torch
        return
    for name in ("OptState", "_refresh_per_optimizer_state"):
        if not hasattr(old_location, name) and hasattr(new_location, name):
            setattr(old_location, name, getattr(new_location, name))


def _fix_hivemind_reexports() -> None:
    import hivemind
    import hivemind.compression as compression
    import hivemind.p2p as p2p
    import hivemind.utils as utils
    from hivemind.compression import serialization
    from hivemind.moe.server.runtime import Runtime
    from hivemind.utils import asyncio as hm_asyncio
    from hivemind.utils import nested, tensor_descr

    names = {}
    for module in (compression, serialization, p2p, utils, hm_asyncio, nested, tensor_descr):
        names.update({k: v for k, v in vars(module).items() if not k.startswith("_")})
    names["Runtime"] = Runtime
    for name, value in names.items():
        if not hasattr(hivemind, name) and not isinstance(value, type(sys)):
            setattr(hivemind, name, value)


def _fix_no_upnp() -> None:
    from hivemind.p2p import p2p_daemon

    original = p2p_daemon.P2P.create.__func__
    if getattr(original, "_far_mesh_no_upnp", False):
        return

    async def create(cls, *args, **kwargs):
        kwargs["nat_port_map"] = False
        return await original(cls, *args, **kwargs)

    create._far_mesh_no_upnp = True
    p2p_daemon.P2P.create = classmethod(create)


def _fix_no_version_check() -> None:
    import petals.cli.run_server as run_server
    import petals.utils.version as version

    def validate_version() -> None:
        import petals

        version.logger.info(f"Running Petals {petals.__version__} (version check against PyPI disabled)")

    version.validate_version = validate_version
    run_server.validate_version = validate_version


def _fix_quiet_session_del() -> None:
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from petals.client import inference_session as inf

    def _safe_to_close() -> bool:
        if sys.is_finalizing():
            return False
        worker_thread = getattr(RemoteExpertWorker, "_event_thread", None)
        # Closing runs a coroutine on the worker's loop and waits for it: never from that loop's own thread.
        return worker_thread is None or (worker_thread.is_alive() and threading.current_thread() is not worker_thread)

    def server_session_del(self):
        if _safe_to_close():
            try:
                self.close()
            except Exception:
                pass

    def session_del(self):
        if _safe_to_close():
            try:
                self.close()
            except Exception:
                pass

    inf._ServerInferenceSession.__del__ = server_session_del
    inf.InferenceSession.__del__ = session_del


def _fix_task_cancel_from_any_thread() -> None:
    import asyncio

    from hivemind.p2p import p2p_daemon
    from hivemind.p2p.p2p_daemon_bindings import control
    from hivemind.utils import asyncio as hm_asyncio

    def cancel_task_if_running(task) -> None:
        if task is None or task.done():
            return
        loop = task.get_loop()
        if loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            task.cancel()
        elif loop.is_running():
            loop.call_soon_threadsafe(task.cancel)

    for module in (hm_asyncio, p2p_daemon, control):
        module.cancel_task_if_running = cancel_task_if_running


def _fix_root_logger_untouched() -> None:
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("in_hivemind")  # hivemind's own loggers keep its handler; the root logger is ours


def _fix_fast_route_repair() -> None:
    from petals.client import inference_session as inf
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

    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from petals.data_structures import CHAIN_DELIMITER

    def _enter_server_sessions(self, chosen_spans):
        """Upstream's loop, but a server that fails to open its session is reported (and so avoided)."""
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
                    self._sequence_manager.on_request_failure(span.peer_id)
                    error._far_mesh_span = span  # the failover report names the server that refused
                    raise
                server_sessions.append(session)
                session.__enter__()
            return server_sessions
        except BaseException:
            self._exit_server_sessions(server_sessions)
            raise

    sm.RemoteSequenceManager.on_request_failure = on_request_failure
    inf.InferenceSession._enter_server_sessions = _enter_server_sessions


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
    import itertools
    import time
    import uuid

    import torch
    from petals.client import inference_session as inf
    from petals.client.routing import maybe_log_traceback
    from petals.utils.misc import DUMMY, DUMMY_INT64, is_dummy

    logger = inf.logger
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
            replacement.history = None  # upstream copies the old history here: that is the #587 bug
            replacement._far_mesh_replay_prefix = prefix

    def step(self, inputs: torch.Tensor, prompts=None, hypo_ids=None) -> torch.Tensor:
        assert not self._closed
        if torch.is_grad_enabled():
            logger.warning("Running inference session with grad enabled. Gradients will *not* be propagated correctly.")
        if prompts is None or is_dummy(prompts):
            prompts = DUMMY
        else:
            assert prompts.ndim == 4 and prompts.shape[0] == self.num_blocks
        if hypo_ids is None or is_dummy(hypo_ids):
            hypo_ids = DUMMY_INT64
        else:
            assert len(hypo_ids) == len(inputs) and hypo_ids.dtype == torch.int64

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
        observer: Callable | None = getattr(self, "step_observer", None)

        failover_observer: Callable | None = getattr(self, "failover_observer", None)
        output_observer: Callable | None = getattr(self, "span_output_observer", None)
        avoid: set | None = getattr(self, "avoid_peers", None)
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
                    current = hidden[:, -n_input_tokens:]
                    if server_session.stepped or prefix_len == 0:
                        to_send = current  # the server holds the cache for [0, prefix_len)
                    elif hidden.shape[1] == prefix_len + n_input_tokens:
                        to_send = hidden  # an upstream replay already produced the full prefix
                    else:
                        replay = getattr(server_session, "_far_mesh_replay_prefix", None)
                        if replay is None or replay.shape[1] != prefix_len:
                            raise RuntimeError(f"cannot rebuild the attention cache of {server_session.span}")
                        to_send = torch.cat([replay, current], dim=1)
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
                    if failed and failover_observer is not None:
                        done = time.perf_counter()
                        for peer_id, blocks, cause, error, started in failed:
                            failover_observer(dict(peer_id=peer_id, blocks=blocks, cause=cause, error=error,
                                                   replaced_by=span.peer_id.to_base58(), stall_s=done - started))
                    failed = []
                    break
                except Exception as e:
                    self._sequence_manager.on_request_failure(
                        server_session.span.peer_id if server_session is not None else None
                    )
                    failed_span = server_session.span if server_session is not None else getattr(
                        e, "_far_mesh_span", None)  # a server that would not open a session (already reported)
                    cause = failure_cause(e)
                    if failed_span is not None:
                        start, end = failed_span.start, failed_span.end
                        failed.append((failed_span.peer_id.to_base58(), f"{start}:{end}", cause, repr(e),
                                       failed[0][4] if failed else attempt_started))
                        if cause != "refused" and no_live_server(self._sequence_manager, start, end):
                            if failover_observer is not None:
                                for peer_id, blocks, cause_, error, started in failed:
                                    failover_observer(dict(peer_id=peer_id, blocks=blocks, cause=cause_, error=error,
                                                           replaced_by=None, stall_s=None))
                            raise SwarmUnavailable(start, end) from e
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

    inf.InferenceSession._update_sequence = _update_sequence
    inf.InferenceSession.step = step


class ServerStreamClosed(ConnectionResetError):
    """The server closed (or lost) the inference stream before answering a step: the server is gone."""


def _fix_dead_peer_stream() -> None:
    import asyncio
    from contextlib import closing

    from hivemind.p2p import p2p_daemon
    from hivemind.p2p.p2p_daemon_bindings.control import P2PHandlerError
    from petals.client import inference_session as inf

    P2P = p2p_daemon.P2P

    async def _iterate_protobuf_stream_handler(self, peer_id, name, requests, output_protobuf_type):
        _, reader, writer = await self.call_binary_stream_handler(peer_id, name)
        waiting_for_request = False  # the writer waits for the caller's next request (it is not sending)

        async def _write_to_stream() -> None:
            nonlocal waiting_for_request
            iterator = requests.__aiter__()
            while True:
                waiting_for_request = True
                try:
                    request = await iterator.__anext__()
                except StopAsyncIteration:
                    break
                finally:
                    waiting_for_request = False
                await P2P.send_protobuf(request, writer)
            await P2P.send_protobuf(P2P.END_OF_STREAM, writer)

        async def _read_from_stream():
            with closing(writer):
                try:
                    while True:
                        try:
                            response, err = await P2P.receive_protobuf(output_protobuf_type, reader)
                        except asyncio.IncompleteReadError:  # Connection is closed
                            break
                        if err is not None:
                            raise P2PHandlerError(f"Failed to call handler `{name}` at {peer_id}: {err.message}")
                        yield response
                    if not (waiting_for_request and not writing_task.done()):
                        await writing_task  # upstream: it finishes sending (or fails) promptly
                    # else: the peer closed the stream and reads nothing more; waiting for the caller's next
                    # request (upstream) would hang until the caller's own timeout
                finally:
                    writing_task.cancel()

        writing_task = asyncio.create_task(_write_to_stream())
        return _read_from_stream()

    P2P._iterate_protobuf_stream_handler = _iterate_protobuf_stream_handler

    async def _step(self, inputs_serialized):
        await self._inputs_queue.put(inputs_serialized)
        self.stepped = True
        try:
            return await asyncio.wait_for(inf.anext(self._outputs_stream), self.config.request_timeout)
        except StopAsyncIteration:
            raise ServerStreamClosed(f"server {self.span.peer_id} closed the inference stream before answering "
                                     f"(it died or dropped the session)") from None

    inf._ServerInferenceSession._step = _step


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
            samples = list(self._samples.get(str(peer_id), ()))
        if not samples:
            return None
        scaled = sorted(seconds * max(1.0, positions / n) for seconds, n in samples)
        return scaled[min(len(scaled) - 1, int(0.99 * len(scaled)))]

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


def _fix_step_latency_budget() -> None:
    import asyncio
    import time

    from petals.client import inference_session as inf

    original_enter = inf.InferenceSession._enter_server_sessions
    original_step = inf._ServerInferenceSession._step

    def _enter_server_sessions(self, chosen_spans):
        sessions = original_enter(self, chosen_spans)
        for session in sessions:
            session._far_mesh_manager = self._sequence_manager
        return sessions

    async def _step(self, request):
        manager = getattr(self, "_far_mesh_manager", None)
        factor, floor_s = getattr(manager, "_far_mesh_step_budget",
                                  (DEFAULT_STEP_BUDGET_FACTOR, DEFAULT_STEP_BUDGET_FLOOR_S))
        sizes = request.tensors[0].size if request is not None and request.tensors else ()
        positions = int(sizes[1]) if len(sizes) >= 2 else 1
        budget = STEP_LATENCY.budget(self.span.peer_id, positions, factor, floor_s)
        started = time.perf_counter()
        if manager is None or budget is None or budget >= self.config.request_timeout:
            response = await original_step(self, request)
        else:
            task = asyncio.ensure_future(original_step(self, request))
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

    inf.InferenceSession._enter_server_sessions = _enter_server_sessions
    inf._ServerInferenceSession._step = _step


_PRE_PETALS = {
    "hf_no_telemetry": _fix_hf_no_telemetry,
    "grad_scaler_location": _fix_grad_scaler_location,
    "hivemind_reexports": _fix_hivemind_reexports,
    "no_upnp": _fix_no_upnp,
}
_POST_PETALS = {
    "no_version_check": _fix_no_version_check,
    "quiet_session_del": _fix_quiet_session_del,
    "task_cancel_from_any_thread": _fix_task_cancel_from_any_thread,
    "root_logger_untouched": _fix_root_logger_untouched,
    "fast_route_repair": _fix_fast_route_repair,
    "failover_replay": _fix_failover_replay,
    "dead_peer_stream": _fix_dead_peer_stream,
    "step_latency_budget": _fix_step_latency_budget,
}


def apply() -> None:
    """Apply every enabled fix once (idempotent, thread-safe)."""
    global _applied
    with _lock:
        if _applied:
            return
        # Known, harmless warnings of the pinned set (not fixes): transformers 4.34 on torch 2.13, and petals
        # loading block weights into meta-initialized modules.
        warnings.filterwarnings("ignore", message=r".*_register_pytree_node.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*copying from a non-meta parameter.*", category=UserWarning)
        for name, fix in _PRE_PETALS.items():
            if _enabled(name):
                fix()
        import petals  # noqa: F401  (only after the pre-import fixes)

        for name, fix in _POST_PETALS.items():
            if _enabled(name):
                fix()
        _applied = True


apply()

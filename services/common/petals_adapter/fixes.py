"""Fixes of upstream bugs and of the environment (PyPI petals 2.2.0.post1 on hivemind 1.1.12 / torch 2.13).

Only fixes live here: each makes the pinned stack behave as upstream intends, none adds behaviour of ours (our
failover behaviour is in failover.py, our hooks on the inference session in session.py). They are applied by
``services.common.petals_adapter`` on import (see its ``FIXES``); each has a test in tests/test_petals_adapter.py
that fails when the fix is removed (``FAR_MESH_DISABLE_COMPAT_FIX=<name>``); docs/install.md lists them.

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
    has its own handler. The handler is removed again; services.common.logs renders all records. Removing it
    leaves the root logger at NOTSET, which enables every library's DEBUG records (py-evm under the payouts
    tests ran 10x slower): the root level petals found is put back.
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
"""

from __future__ import annotations

import logging
import os
import sys
import threading


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


# The root logger's level when petals was imported (petals' import sets it to INFO; set by ``apply()``).
ROOT_LOGGER_LEVEL = logging.WARNING


def _fix_root_logger_untouched() -> None:
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("in_hivemind")  # hivemind's own loggers keep its handler; the root logger is ours
    # ... and so is its level: leaving the root handler sets it to NOTSET, which enables DEBUG in every library
    # that does not set its own level (every record is then built and handled: web3/py-evm ran 10x slower).
    logging.getLogger().setLevel(ROOT_LOGGER_LEVEL)


class ServerStreamClosed(ConnectionResetError):
    """The server closed (or lost) the inference stream before answering a step: the server is gone."""


def _fix_dead_peer_stream() -> None:
    import asyncio
    from contextlib import closing

    from hivemind.p2p import p2p_daemon
    from hivemind.p2p.p2p_daemon_bindings.control import P2PHandlerError

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
    # the step's half (a stream that ends mid-step raises ServerStreamClosed) is in failover.patch_server_sessions,
    # which patches _ServerInferenceSession._step once for every fix that changes it


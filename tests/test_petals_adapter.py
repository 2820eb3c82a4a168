"""Every entry of ``FIXES`` in services/common/petals_adapter has a test here that fails when it is removed.

Each test runs a small program in a fresh interpreter twice: with the fix (must behave) and with the fix
switched off through FAR_MESH_DISABLE_COMPAT_FIX (must show the upstream problem), so the test also proves
the fix is still needed on the pinned stack. ``failover_replay`` is covered by
tests/test_swarm_generation.py::test_replica_killed_mid_generation_output_identical (with the fix) and by
``test_failover_without_fix_breaks`` below (without it).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from services.common import petals_adapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each test runs fresh interpreters that import petals and most start hivemind p2p daemons (10-20 s each):
# the swarm tier, not the quick one.
pytestmark = pytest.mark.swarm


def run_py(code: str, *, disable: str | None = None, timeout: float = 60, env_extra: dict | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))}
    env["PYTHONPATH"] = ROOT
    env.pop("FAR_MESH_DISABLE_COMPAT_FIX", None)
    if disable:
        env["FAR_MESH_DISABLE_COMPAT_FIX"] = disable
    env.update(env_extra or {})
    try:
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                                timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None  # hung
    return result


def test_every_fix_is_listed_and_tested():
    tested = {name.removeprefix("test_fix_") for name in globals() if name.startswith("test_fix_")}
    assert tested == set(petals_adapter.FIXES)


def test_fix_hivemind_reexports():
    code = "import services.common.petals_adapter; import petals; from hivemind import PeerID, get_dht_time; print('ok')"
    fixed = run_py(code)
    assert fixed.returncode == 0, fixed.stderr
    broken = run_py(code, disable="hivemind_reexports")
    assert broken.returncode != 0 and "cannot import name" in broken.stderr


def test_fix_grad_scaler_location():
    code = """
        import services.common.petals_adapter
        from torch.cuda.amp.grad_scaler import OptState, _refresh_per_optimizer_state
        print('ok')
    """
    assert run_py(code).returncode == 0
    broken = run_py(code, disable="grad_scaler_location")
    assert broken.returncode != 0 and "_refresh_per_optimizer_state" in broken.stderr


def test_fix_no_upnp():
    code = """
        import asyncio, psutil
        import services.common.petals_adapter
        from hivemind.p2p import P2P

        async def main():
            p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            daemons = [c for c in psutil.Process().children(recursive=True) if "p2pd" in c.name()]
            print(" ".join(daemons[0].cmdline()))
            await p2p.shutdown()

        asyncio.run(main())
    """
    fixed = run_py(code)
    assert fixed.returncode == 0, fixed.stderr
    assert "-natPortMap=0" in fixed.stdout
    broken = run_py(code, disable="no_upnp")
    assert "-natPortMap=1" in broken.stdout


def test_fix_hf_no_telemetry():
    """Telemetry is off, but the hub stays reachable: real deployments download hub models."""
    code = ("import services.common.petals_adapter; from huggingface_hub import constants; "
            "print(constants.HF_HUB_DISABLE_TELEMETRY, constants.HF_HUB_OFFLINE)")
    assert run_py(code).stdout.strip() == "True False"
    assert run_py(code, disable="hf_no_telemetry").stdout.strip() == "False False"


def test_fix_no_version_check():
    code = """
        import services.common.petals_adapter
        import requests
        calls = []
        def no_network(*args, **kwargs):
            calls.append(args)
            raise RuntimeError("network access attempted")
        requests.get = no_network
        import petals.cli.run_server as run_server
        run_server.validate_version()
        print(len(calls))
    """
    assert run_py(code).stdout.strip() == "0"
    assert run_py(code, disable="no_version_check").stdout.strip() == "1"


def test_fix_quiet_session_del():
    """A session destructor that runs on the RemoteExpertWorker loop thread (where GC can trigger it) must not
    wait on that same loop: upstream it deadlocks."""
    code = """
        import asyncio
        import services.common.petals_adapter
        from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
        from petals.client.inference_session import _ServerInferenceSession

        session = object.__new__(_ServerInferenceSession)
        session._outputs_stream = object()
        session._inputs_queue = None
        session.stepped = False
        session.closed = False

        async def collect_on_worker_loop():
            session.__del__()

        RemoteExpertWorker.run_coroutine(collect_on_worker_loop())
        print("returned")
    """
    fixed = run_py(code, timeout=30)
    assert fixed is not None and fixed.stdout.strip() == "returned", fixed and fixed.stderr
    assert run_py(code, disable="quiet_session_del", timeout=15) is None  # hangs upstream


def test_fix_task_cancel_from_any_thread():
    code = """
        import asyncio, threading, time
        import services.common.petals_adapter
        from hivemind.p2p import p2p_daemon

        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        async def make():
            return asyncio.ensure_future(asyncio.sleep(3600))
        task = asyncio.run_coroutine_threadsafe(make(), loop).result()
        try:
            p2p_daemon.cancel_task_if_running(task)  # as P2P.__del__ does, from the GC's thread
        except RuntimeError as error:
            print("error:", error)
        time.sleep(0.2)
        print("cancelled" if task.cancelled() else "still running")
    """
    assert run_py(code).stdout.strip().splitlines()[-1] == "cancelled"
    assert run_py(code, disable="task_cancel_from_any_thread").stdout.strip().splitlines()[-1] != "cancelled"


FAILOVER_SCRIPT = """
import json, os, signal, sys
from services.coordinator.engine import SwarmModel
from services.coordinator.metering import WorkMeter
from services.coordinator.sampling import SamplingParams

model_dir, peers, victims = sys.argv[1], sys.argv[2].split(","), json.loads(sys.argv[3])
client = SwarmModel("far-mesh/tiny-llama", model_dir, peers, request_timeout=5, max_retries=4)
generation = client.start(client.encode("def compute(a, b):"), SamplingParams(max_tokens=24, temperature=0), WorkMeter())
tokens = []
for delta in generation:
    tokens.append(delta.token_id)
    if delta.index == 8:
        for hop in generation.route():
            if hop["peer_id"] in victims:
                os.killpg(victims[hop["peer_id"]], signal.SIGKILL)
print(json.dumps(tokens))
"""


@pytest.mark.swarm
def test_fix_failover_replay(fresh_swarm, tiny_model_dir):
    """Without the fix, the replacement server rejects every replay ("Broken input cache") until the client
    gives up; with it, the same scenario completes (and matches the local model: see test_swarm_generation)."""
    fresh_swarm.start_node("a", "0:2")
    fresh_swarm.start_node("b", "2:4")
    fresh_swarm.start_node("c", "2:4")
    fresh_swarm.wait_online(["a", "b", "c"], 4)
    victims = {fresh_swarm.nodes[n].peer_id: fresh_swarm.nodes[n].process.pid for n in ("b", "c")}
    args = [str(tiny_model_dir), ",".join(fresh_swarm.initial_peers), json.dumps(victims)]
    env = dict(os.environ, PYTHONPATH=ROOT, FAR_MESH_DISABLE_COMPAT_FIX="failover_replay")
    broken = subprocess.run([sys.executable, "-c", FAILOVER_SCRIPT, *args], capture_output=True, text=True,
                            timeout=180, env=env, cwd=ROOT)
    assert broken.returncode != 0
    assert "Broken input cache" in broken.stderr


def test_fix_root_logger_untouched():
    code = """
        import logging
        import services.common.petals_adapter
        from hivemind.utils import logging as hm_logging
        print(hm_logging._default_handler in logging.getLogger().handlers, logging.getLogger().level)
    """
    # The root logger keeps no hivemind handler and the level it had (WARNING, Python's default): not NOTSET,
    # which would enable every library's DEBUG records.
    assert run_py(code).stdout.strip() == f"False {logging.WARNING}"
    assert run_py(code, disable="root_logger_untouched").stdout.strip() == f"True {logging.INFO}"


def test_fix_fast_route_repair():
    """A failed server leaves the router's view at once (upstream it stays routable until the next refresh), and
    a server that refuses to open a session is reported as failed (upstream nobody is)."""
    code = """
        import threading, types
        import services.common.petals_adapter
        from hivemind import PeerID
        from petals.client.inference_session import InferenceSession
        from petals.client.routing.sequence_info import RemoteSequenceInfo
        from petals.client.routing.sequence_manager import RemoteSequenceManager
        from hivemind.dht.node import Blacklist
        from petals.data_structures import RemoteModuleInfo, RemoteSpanInfo, ServerInfo, ServerState

        alive, dead = PeerID(b"alive-peer-id"), PeerID(b"dead-peer-id")
        info = lambda: ServerInfo(state=ServerState.ONLINE, throughput=1.0, start_block=0, end_block=2)
        blocks = [RemoteModuleInfo(f"m.{i}", {alive: info(), dead: info()}) for i in range(2)]
        spans, containing = RemoteSequenceInfo._sort_spans(blocks)
        state = types.SimpleNamespace(banned_peers=Blacklist(base_time=15, backoff_rate=2.0),
                                      sequence_info=RemoteSequenceInfo(("m.0", "m.1"), tuple(blocks), spans,
                                                                       containing, None))
        manager = types.SimpleNamespace(state=state, lock_changes=threading.Lock(), update=lambda wait: None,
                                        ready=threading.Event())
        RemoteSequenceManager.on_request_failure(manager, dead)
        routable = {span.peer_id for spans in state.sequence_info.spans_containing_block for span in spans}
        print("routable-after-failure:", sorted(p.to_bytes().decode() for p in routable))

        reported = []
        refusing = types.SimpleNamespace(
            block_uids=("m.0", "m.1"), config=None, rpc_info=None,
            state=types.SimpleNamespace(p2p=None),
            get_request_metadata=lambda *a, **k: {},
            on_request_failure=lambda peer: reported.append(peer))
        session = object.__new__(InferenceSession)
        session._sequence_manager, session._max_length, session._server_sessions = refusing, 8, []
        try:
            session._enter_server_sessions([RemoteSpanInfo(dead, 0, 2, info())])
        except Exception:
            pass
        print("reported:", [p.to_bytes().decode() for p in reported])
    """
    fixed = run_py(code)
    assert fixed.returncode == 0, fixed.stderr
    assert "routable-after-failure: ['alive-peer-id']" in fixed.stdout
    assert "reported: ['dead-peer-id']" in fixed.stdout
    broken = run_py(code, disable="fast_route_repair")
    assert "routable-after-failure: ['alive-peer-id', 'dead-peer-id']" in broken.stdout
    assert "reported: []" in broken.stdout


def test_fix_dead_peer_stream():
    """A peer whose p2pd dies while a streamed request is in flight: the caller's response stream ends at once
    (upstream it hangs until the caller's own timeout, because hivemind awaits the writer, which waits for the
    caller's next request); and a Petals server session turns that early end into a connection error."""
    code = """
        import asyncio, os, signal, time
        import services.common.petals_adapter as adapter
        from hivemind.p2p import P2P
        from hivemind.proto import test_pb2
        from hivemind.utils.asyncio import anext

        async def main():
            server = await P2P.create()
            async def silent(requests, context):
                async for _ in requests:
                    await asyncio.sleep(3600)  # a step in flight: never answers
                yield test_pb2.TestResponse(number=0)
            await server.add_protobuf_handler("step", silent, test_pb2.TestRequest, stream_input=True,
                                              stream_output=True)
            client = await P2P.create(initial_peers=await server.get_visible_maddrs())
            queue = asyncio.Queue()
            async def requests():
                while True:
                    yield await queue.get()
            responses = await client.iterate_protobuf_handler(server.peer_id, "step", requests(),
                                                              test_pb2.TestResponse)
            await queue.put(test_pb2.TestRequest(number=1))
            pending = asyncio.ensure_future(anext(responses))
            await asyncio.sleep(0.5)
            os.kill(server._child.pid, signal.SIGKILL)  # the server's host dies mid-request
            killed = time.perf_counter()
            try:
                await asyncio.wait_for(pending, 8)
                outcome = "answered"
            except StopAsyncIteration:
                outcome = "ended"
            except asyncio.TimeoutError:
                outcome = "hung"
            print(f"stream {outcome} after {time.perf_counter() - killed:.2f} s", flush=True)
            await client.shutdown()

        asyncio.run(main())

        from petals.client.inference_session import _ServerInferenceSession
        async def closed_stream():
            return
            yield
        session = object.__new__(_ServerInferenceSession)
        session._inputs_queue, session._outputs_stream = asyncio.Queue(), closed_stream()
        session.config = type("Config", (), {"request_timeout": 8})()
        session.span = type("Span", (), {"peer_id": "peer-x"})()
        try:
            asyncio.run(session._step(None))
        except Exception as error:
            print("step raised", type(error).__name__, isinstance(error, ConnectionError))
    """
    fixed = run_py(code)
    assert fixed is not None and fixed.returncode == 0, fixed and fixed.stderr
    print(fixed.stdout)
    ended = fixed.stdout.splitlines()[0].split()
    assert ended[1] == "ended" and float(ended[3]) < 2.0, fixed.stdout
    assert "step raised ServerStreamClosed True" in fixed.stdout
    broken = run_py(code, disable="dead_peer_stream")
    print(broken.stdout)
    assert broken.stdout.startswith("stream hung after 8"), broken.stdout
    assert "step raised StopAsyncIteration False" in broken.stdout


def test_fix_step_latency_budget():
    """A server that stops answering mid-step (frozen) is given up after max(floor, factor x its p99) when another
    live server holds its blocks (upstream: only after request_timeout); with no alternative it is waited for."""
    code = """
        import asyncio, threading, time, types
        import torch
        import services.common.petals_adapter as adapter
        from hivemind import PeerID, serialize_torch_tensor
        from hivemind.dht.node import Blacklist
        from hivemind.proto import runtime_pb2
        from petals.client.inference_session import _ServerInferenceSession
        from petals.data_structures import RemoteSpanInfo, ServerInfo, ServerState

        info = ServerInfo(state=ServerState.ONLINE, throughput=1.0, start_block=2, end_block=4)
        frozen, replica = PeerID(b"frozen-peer-id"), PeerID(b"replica-peer-id")
        spans = [RemoteSpanInfo(frozen, 2, 4, info), RemoteSpanInfo(replica, 2, 4, info)]
        manager = types.SimpleNamespace(lock_changes=threading.Lock(), state=types.SimpleNamespace(
            banned_peers=Blacklist(base_time=60, backoff_rate=2.0),
            sequence_info=types.SimpleNamespace(spans_containing_block=[[], [], spans, spans])))
        adapter.configure_step_budget(manager, 5.0, 0.5)
        for _ in range(20):
            adapter.STEP_LATENCY.record(frozen, 0.02, 1)  # its usual steps: 20 ms -> budget max(0.5, 0.1) s

        async def never_answers():
            await asyncio.sleep(3600)
            yield

        def frozen_step(request_timeout):
            session = object.__new__(_ServerInferenceSession)
            session._inputs_queue, session._outputs_stream = asyncio.Queue(), never_answers()
            session.config = types.SimpleNamespace(request_timeout=request_timeout)
            session.span, session._far_mesh_manager = spans[0], manager
            request = runtime_pb2.ExpertRequest(tensors=[serialize_torch_tensor(torch.zeros(1, 1, 8))])
            started = time.perf_counter()
            try:
                asyncio.run(session._step(request))
            except Exception as error:
                return f"{type(error).__name__} after {time.perf_counter() - started:.1f} s"

        print("with replica:", frozen_step(6))
        manager.state.banned_peers.register_failure(replica)
        print("replica banned:", frozen_step(2))
    """
    fixed = run_py(code)
    assert fixed is not None and fixed.returncode == 0, fixed and fixed.stderr
    print(fixed.stdout)
    assert "with replica: StepDeadlineExceeded after 0.5 s" in fixed.stdout
    assert "replica banned: TimeoutError after 2.0 s" in fixed.stdout  # waited: nobody else holds the blocks
    broken = run_py(code, disable="step_latency_budget")
    print(broken.stdout)
    assert "with replica: TimeoutError after 6.0 s" in broken.stdout


def test_step_latency_p99_scales_multi_position_samples_only_up():
    from services.common.petals_adapter import StepLatency

    latency = StepLatency(window=100)
    assert latency.p99("peer") is None
    for i in range(100):
        latency.record("peer", (i + 1) / 1000, 1)  # 1..100 ms decode steps
    assert latency.p99("peer") == 0.1  # index 99 of 100
    latency.record("peer", 0.5, 50)  # a 50-position prefill: counts as 10 ms per position for 1 position...
    assert latency.p99("peer") == 0.5  # ...but the raw time counts for a decode step (never scaled down)
    assert latency.p99("peer", positions=10) == max(0.5, 0.1 * 10)  # a 1-position sample scales up to 10
    assert latency.budget("peer", 1, factor=5.0, floor_s=1.0) == 2.5
    assert latency.budget("peer", 1, factor=0.0, floor_s=1.0) is None
    latency.clear()
    assert latency.p99("peer") is None


def test_fix_lean_client_step():
    """A hop's request from the lean step is upstream's, byte for byte: the first step (the session's metadata, the
    whole history), later ones (next_servers), and a step with real hypo_ids (upstream's own path)."""
    from types import SimpleNamespace

    import torch
    from hivemind import deserialize_torch_tensor, serialize_torch_tensor
    from hivemind.proto import runtime_pb2
    from hivemind.utils.tensor_descr import BatchTensorDescriptor
    from petals.client import inference_session as inf
    from petals.utils.misc import DUMMY, DUMMY_INT64

    lean = inf._ServerInferenceSession.step
    upstream = lean._far_mesh_original  # not there without the fix

    def fake_session(requests: list):
        session = object.__new__(inf._ServerInferenceSession)
        next_session = SimpleNamespace(stepped=True, session_id="next-session", next_session=None,
                                       span=SimpleNamespace(start=2, end=4, peer_id=SimpleNamespace(to_base58=lambda: "QmNext")))
        schema = (BatchTensorDescriptor(1, 1, 8, compression=runtime_pb2.CompressionType.NONE),) * 3
        session.__dict__.update(
            closed=False, history=None, _position=0, stepped=False, session_id="this-session", uid="m.0:m.1",
            session_metadata=dict(session_id="this-session", max_length=32, points=0.0),
            config=SimpleNamespace(use_server_to_server=True), next_session=next_session,
            rpc_info={"inference_schema": (schema, None)}, span="0:2")

        async def capture(request):
            requests.append(request.SerializeToString())
            session.stepped = True
            hidden = deserialize_torch_tensor(request.tensors[0])
            return runtime_pb2.ExpertResponse(tensors=[serialize_torch_tensor(hidden * 2)])

        session._step = capture
        return session

    generator = torch.Generator().manual_seed(0)
    steps = [(torch.randn(1, 5, 8, generator=generator), DUMMY, DUMMY_INT64),
             (torch.randn(1, 1, 8, generator=generator), DUMMY[0:2], DUMMY_INT64),
             (torch.randn(1, 1, 8, generator=generator), DUMMY, DUMMY_INT64),
             (torch.randn(2, 1, 8, generator=generator), DUMMY, torch.tensor([1, 0]))]  # beam reorder: upstream path
    lean_requests, upstream_requests = [], []
    lean_session, upstream_session = fake_session(lean_requests), fake_session(upstream_requests)
    for index, (inputs, prompts, hypo_ids) in enumerate(steps[:3]):
        out_lean = lean(lean_session, inputs, prompts, hypo_ids, step_id=f"step-{index}")
        out_upstream = upstream(upstream_session, inputs, prompts, hypo_ids, step_id=f"step-{index}")
        assert torch.equal(out_lean, out_upstream)
    assert lean_requests == upstream_requests and len(lean_requests) == 3
    assert b"next_servers" in lean_requests[1] and b"max_length" in lean_requests[0]
    assert lean_session._position == upstream_session._position == 7
    assert "_far_mesh_lean_step" in lean_session.__dict__  # the placeholders were reused, not rebuilt

    inputs, prompts, hypo_ids = steps[3]
    beam_lean, beam_upstream = fake_session([]), fake_session([])
    lean(beam_lean, inputs, prompts, hypo_ids, step_id="beam")
    upstream(beam_upstream, inputs, prompts, hypo_ids, step_id="beam")
    assert "_far_mesh_lean_step" not in beam_lean.__dict__  # upstream's own path served it

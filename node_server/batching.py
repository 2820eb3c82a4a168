"""Server-side batching: decode steps of different inference sessions run as one forward pass per block.

Petals 2.2.0 runs every session's step as its own runtime task (average batch size 1.00), so concurrent users
queue behind each other, while a block's forward on this kind of machine is memory-bandwidth bound: a batch of 8
costs far less than 8 batches of one (docs/batching.md has the figures). This module
replaces the server's merged inference pool (``petals.server.backend.merge_inference_pools_inplace``) with
:class:`BatchingInferencePool`, which hands the runtime *all* waiting steps at once:

* **decode steps** (one new position, no deep prompts, no beam reordering, no adapter) of different sessions
  that wait at the same time are stacked into one ``[rows, 1, hidden]`` tensor and run through each block
  together: the norms, the q/k/v/o projections and the MLP (the weight reads that dominate) run once for the
  whole batch; rotary embeddings use each row's own position, and attention runs per session over that
  session's own attention cache (no padding, no session sees another's tokens). New keys/values are written
  into each session's own cache, exactly where Petals writes them.
* **other steps** (prefill, replays, anything with prompts/hypo_ids/adapters, other architectures) run through
  Petals' own code path. A long prefill is cut into chunks of ``prefill_chunk_tokens`` positions, one chunk per
  runtime iteration, so running sessions' decode steps are served between chunks (chunked prefill is exact for
  causal attention: each chunk's keys/values are complete in every block before the next chunk starts).
* A session that fails (its cache was freed because its client vanished, a bad shape, ...) gets its own
  exception; its batch-mates get their results. If the batched computation itself raises, each session of the
  batch is re-run on its own (the cache positions it rewrites are the same), so only the culprit fails.

* Small tensors cross between the handler processes and the runtime **by value** (a step's hidden states, its
  result, the future's state code): torch's multiprocessing pickler would put each into a new shared-memory
  segment and hand its file descriptor over a Unix socket, on both sides, serialised with the batch
  (docs/batching.md "What one runtime iteration does").

Nothing changes on the wire: the handler, the protocol and the client are Petals' own. The runtime must not
prefetch batches (``prefetch_batches=0``): with prefetch, a background thread pulls each step out of the queue
the moment it arrives, one by one, and there is nothing left to batch. :func:`server_kwargs` sets it.

Switch: ``ServerOptions.batching`` (``far-node run --no-batching``), or ``FAR_MESH_DISABLE_COMPAT_FIX=batching``
(the same fence as the compat fixes). ``STATS`` counts batches and sessions; the node's status file carries it.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from services.common import packed_linear

logger = logging.getLogger(__name__)

DEFAULT_MAX_SESSIONS = 64
DEFAULT_PREFILL_CHUNK_TOKENS = 64
DEFAULT_BATCH_WAIT_MS = 50.0
RECENT_WAIT_MS = 4.0  # the short wait for any recently active session (see load_batch_to_runtime)


class BatchingStats:
    """Counters of the runtime thread (read by the status writer of the same process)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with getattr(self, "_lock", threading.Lock()):
            self.decode_batches = 0  # batched forward passes (one per block chain)
            self.decode_steps = 0  # session steps served by them
            self.max_batch = 0
            self.prefill_chunks = 0
            self.other_steps = 0  # steps run through Petals' own path (prefill, prompts, ...)
            self.failed_steps = 0
            self.isolated_reruns = 0  # batches re-run per session after the batched pass raised

    def record_batch(self, size: int) -> None:
        with self._lock:
            self.decode_batches += 1
            self.decode_steps += size
            self.max_batch = max(self.max_batch, size)

    def add(self, name: str, count: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + count)

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "decode_batches": self.decode_batches,
                "decode_steps": self.decode_steps,
                "avg_batch": round(self.decode_steps / self.decode_batches, 3) if self.decode_batches else 0.0,
                "max_batch": self.max_batch,
                "prefill_chunks": self.prefill_chunks,
                "other_steps": self.other_steps,
                "failed_steps": self.failed_steps,
                "isolated_reruns": self.isolated_reruns,
            }


STATS = BatchingStats()


# -- the batched block forward (Llama family) ------------------------------------------------------------------

@dataclass
class SessionSlice:
    """One session's rows in a batch and its attention cache for one block (Petals' cache layout:
    keys ``[batch, kv_heads, head_dim, max_length]``, values ``[batch, kv_heads, max_length, head_dim]``)."""

    start: int
    stop: int
    prefix_length: int
    key_cache: torch.Tensor
    value_cache: torch.Tensor


def supports_batched_decode(layer: torch.nn.Module) -> bool:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    attn = getattr(layer, "self_attn", None)
    return (isinstance(layer, LlamaDecoderLayer) and attn is not None
            and getattr(attn.config, "pretraining_tp", 1) == 1 and hasattr(attn, "rotary_emb"))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class PackedProjections:
    """oneDNN-packed copies of one Llama block's projections for the batched decode (services/common/packed_linear.py;
    faster at several rows than ``F.linear``, docs/batching.md), with q/k/v fused into one matrix
    and gate/up into another. Petals' own path (prefill, replays) keeps using the modules' weights."""

    qkv: torch.Tensor
    q_size: int
    kv_size: int
    o: torch.Tensor
    gate_up: torch.Tensor
    intermediate: int
    down: torch.Tensor


def _pack(layer: torch.nn.Module) -> Optional[PackedProjections]:
    """The packed projections of ``layer``, or None where oneDNN cannot serve them (not float32 on CPU, biases,
    a tensor-parallel split, oneDNN missing or switched off: FAR_MESH_DISABLE_COMPAT_FIX=packed_linear)."""
    attn, mlp = layer.self_attn, layer.mlp
    linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    weights = [linear.weight for linear in linears]
    if (not all(packed_linear.can_pack(w) for w in weights)
            or any(linear.bias is not None for linear in linears)
            or getattr(getattr(mlp, "config", None), "pretraining_tp", 1) != 1):
        return None
    return PackedProjections(
        qkv=packed_linear.pack(torch.cat(weights[:3])), q_size=weights[0].shape[0], kv_size=weights[1].shape[0],
        o=packed_linear.pack(weights[3]), gate_up=packed_linear.pack(torch.cat(weights[4:6])),
        intermediate=weights[4].shape[0], down=packed_linear.pack(weights[6]))


_NOT_PACKED = object()


def packed_projections(layer: torch.nn.Module) -> Optional[PackedProjections]:
    """``layer``'s packed projections, made on first use (runtime thread) and kept on the layer."""
    packed = layer.__dict__.get("_far_mesh_packed", None)
    if packed is None:
        try:
            packed = _pack(layer) or _NOT_PACKED
        except Exception as error:  # an unusual torch build: the modules' own path still works
            logger.warning("oneDNN packing of a block failed (%r); the batched decode uses F.linear", error)
            packed = _NOT_PACKED
        layer.__dict__["_far_mesh_packed"] = packed
    return None if packed is _NOT_PACKED else packed


@torch.inference_mode()
def llama_decode_batch(layer: torch.nn.Module, hidden: torch.Tensor, sessions: Sequence[SessionSlice]) -> torch.Tensor:
    """One decode step of several sessions through one Llama block: ``hidden`` is ``[rows, 1, hidden_size]``,
    each session owns rows ``[start, stop)`` and its cache; returns the block's output for all rows and writes
    each session's new key/value at its own ``prefix_length``."""
    attn = layer.self_attn
    rows = hidden.shape[0]
    heads, kv_heads, head_dim = attn.num_heads, attn.num_key_value_heads, attn.head_dim
    groups = heads // kv_heads
    packed = packed_projections(layer)
    linear = packed_linear.linear

    residual = hidden
    x = layer.input_layernorm(hidden)
    if packed is not None:
        qkv = linear(x.view(rows, -1), packed.qkv)
        q, k, v = qkv.split([packed.q_size, packed.kv_size, packed.kv_size], dim=-1)
        q = q.reshape(rows, heads, head_dim)
        k = k.reshape(rows, kv_heads, head_dim)
        v = v.reshape(rows, kv_heads, head_dim)
    else:
        q = attn.q_proj(x).view(rows, heads, head_dim)
        k = attn.k_proj(x).view(rows, kv_heads, head_dim)
        v = attn.v_proj(x).view(rows, kv_heads, head_dim)

    positions = torch.empty(rows, dtype=torch.long)
    for s in sessions:
        positions[s.start:s.stop] = s.prefix_length
    cos, sin = attn.rotary_emb(v, seq_len=int(positions.max()) + 1)  # [1, 1, seq, head_dim]
    cos = cos[0, 0].index_select(0, positions).unsqueeze(1)  # [rows, 1, head_dim]
    sin = sin[0, 0].index_select(0, positions).unsqueeze(1)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin

    scale = 1.0 / math.sqrt(head_dim)
    out = torch.empty(rows, heads * head_dim, dtype=hidden.dtype)
    for s in sessions:
        b, p = s.stop - s.start, s.prefix_length
        s.key_cache[:, :, :, p] = k[s.start:s.stop]
        s.value_cache[:, :, p, :] = v[s.start:s.stop]
        keys = s.key_cache[:, :, :, : p + 1]  # [b, kv, d, p+1]
        values = s.value_cache[:, :, : p + 1, :]  # [b, kv, p+1, d]
        qs = q[s.start:s.stop].view(b, kv_heads, groups, head_dim)
        scores = torch.matmul(qs, keys) * scale  # [b, kv, groups, p+1]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        out[s.start:s.stop] = torch.matmul(probs, values).reshape(b, heads * head_dim)
    if packed is None:
        x = residual + attn.o_proj(out.view(rows, 1, heads * head_dim))
        return x + layer.mlp(layer.post_attention_layernorm(x))
    x = residual + linear(out, packed.o).view(rows, 1, -1)
    gate, up = linear(layer.post_attention_layernorm(x).view(rows, -1), packed.gate_up).split(
        [packed.intermediate, packed.intermediate], dim=-1)
    return x + linear(layer.mlp.act_fn(gate) * up, packed.down).view(rows, 1, -1)


# -- crossing between the handler processes and the runtime process ---------------------------------------------

BY_VALUE_MAX_BYTES = 256 * 1024  # larger tensors (long prefills) still go through shared memory


def _tensor_from_bytes(data: bytes, dtype: str, shape: tuple) -> torch.Tensor:
    dtype = getattr(torch, dtype)
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


class ByValue:
    """Pickles as the bytes of a tensor and unpickles as a plain tensor (for any pickler, torch's included)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __reduce__(self):
        t = self.tensor.detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return _tensor_from_bytes, (data, str(t.dtype).removeprefix("torch."), tuple(t.shape))


def by_value(value):
    """``value`` wrapped to cross processes by value when it is a small CPU tensor; else unchanged."""
    if (isinstance(value, torch.Tensor) and value.device.type == "cpu"
            and value.nelement() * value.element_size() <= BY_VALUE_MAX_BYTES):
        return ByValue(value)
    return value


def _result_for_handler(tensor: torch.Tensor):
    tensor = tensor.detach().cpu()
    wrapped = by_value(tensor)
    return wrapped if wrapped is not tensor else tensor.share_memory_()


LeanMPFuture = None  # set by _make_pool_class (hivemind is imported lazily, after the compat fixes)


def _make_lean_future_class():
    from multiprocessing.reduction import ForkingPickler

    from hivemind.utils.mpfuture import MPFuture

    class LeanMPFuture(MPFuture):
        """An MPFuture whose state code crosses to the runtime by value (upstream shares it in shared memory
        for ``cancel()``, which Petals' pools disable anyway: they give each future a private state code)."""

        def __getstate__(self):
            state = super().__getstate__()
            state["_shared_state_code"] = ForkingPickler.dumps(ByValue(self._shared_state_code)).tobytes()
            return state

    LeanMPFuture.__qualname__ = "LeanMPFuture"  # pickled by reference: node_server.batching.LeanMPFuture
    return LeanMPFuture


# -- the task pool ------------------------------------------------------------------------------------------------

@dataclass
class _Prefill:
    task: Any
    offset: int = 0
    outputs: list = field(default_factory=list)


@dataclass
class _Work:
    decode: list  # tasks
    prefill: Optional[_Prefill] = None
    prefill_last: bool = False
    results: list = field(default_factory=list)  # (task, outputs tuple | BaseException)


def _make_pool_class():
    global LeanMPFuture
    from concurrent.futures._base import PENDING

    from hivemind.utils.mpfuture import ALL_STATES, MPFuture
    from petals.server.task_pool import PrioritizedTaskPool, Task

    LeanMPFuture = LeanMPFuture or _make_lean_future_class()

    class BatchingInferencePool(PrioritizedTaskPool):
        """A drop-in for Petals' merged inference pool that batches concurrent sessions' decode steps."""

        def __init__(self, backends: dict, *, max_batch_size: int, device=None, name: str = "batching_inference",
                     max_sessions: int = DEFAULT_MAX_SESSIONS,
                     prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS, batch_wait_ms: float = 0.0,
                     stats: BatchingStats = STATS):
            from petals.server.backend import _MergedInferenceStep

            super().__init__(self._process, max_batch_size=max_batch_size, device=device, name=name)
            self.backends = backends
            self._petals_step = _MergedInferenceStep(backends)
            self.max_sessions = max(1, int(max_sessions))
            self.prefill_chunk_tokens = max(1, int(prefill_chunk_tokens))
            self.stats = stats
            self._batchable_uids = {uid for uid, backend in backends.items()
                                    if len(backend.module.module_shards) == 1
                                    and supports_batched_decode(backend.module.module_shards[0])}
            self._prefills: deque[_Prefill] = deque()  # runtime thread only
            self._works: dict[int, _Work] = {}
            # session (cache handles of its first block) -> (time of its last decode pass, the sessions of that pass)
            self._mates: dict[tuple, tuple[float, frozenset]] = {}
            self.memory_cache = next(iter(backends.values())).memory_cache
            self.batch_wait_s = max(0.0, float(batch_wait_ms)) / 1000.0
            self.active_window_s = 1.0
            self._work_ids = itertools.count()

        # -- submitting (handler processes) -------------------------------------------------------------------
        def submit_task(self, *args, priority: float = 0.0):
            """Petals' ``submit_task``, with the task's small tensors and its future's state code by value."""
            MPFuture._maybe_initialize_mpfuture_backend()  # on MPFuture itself: run from a subclass, it would
            future = LeanMPFuture()                         # set the backend's class attributes on the subclass
            future._shared_state_code = torch.tensor([ALL_STATES.index(PENDING)], dtype=torch.uint8)
            if self.get_task_size(Task(priority, 0.0, future, args)) > self.max_batch_size:
                future.set_exception(ValueError(
                    f"Task size greater than max_batch_size ({self.max_batch_size}), it can't be processed"))
                return future
            task = Task(priority, time.monotonic(), future, tuple(by_value(arg) for arg in args))
            self.submitted_tasks.put(task)
            self.batch_sender.send(None)  # one token per unfinished task (load_batch_to_runtime takes them)
            if (task.priority, task.time_submitted) < self.priority:
                self.priority = (task.priority, task.time_submitted)
            return future

        # -- forming work (runtime thread) --------------------------------------------------------------------
        def _is_decode(self, task) -> bool:
            from petals.utils.misc import is_dummy

            hidden, hypo_ids, infos, *prompts = task.args
            return (isinstance(hidden, torch.Tensor) and hidden.ndim == 3 and hidden.shape[1] == 1
                    and is_dummy(hypo_ids) and all(p is None for p in prompts)
                    and all(not info.active_adapter and info.uid in self._batchable_uids for info in infos))

        def _session_key(self, task):
            return task.args[2][0].cache_handles

        def _forget_idle_sessions(self, now: float) -> None:
            """Keep only the sessions that stepped in the last second and still hold their cache."""
            with self.memory_cache.use_cache():  # applies the handlers' allocations and frees
                live = self.memory_cache._allocated_tensors
            for key, (seen, _mates) in list(self._mates.items()):
                if now - seen > self.active_window_s or key[0] not in live:
                    del self._mates[key]

        def _missing_mates(self, decode: list) -> set:
            """The sessions that shared their last pass with a session of ``decode`` and are not in ``decode``:
            in-phase sessions whose next steps are on their way."""
            here = {self._session_key(task) for task in decode}
            wanted = set()
            for key in here:
                entry = self._mates.get(key)
                if entry is not None:
                    wanted.update(mate for mate in entry[1] if mate in self._mates)
            return wanted - here

        def load_batch_to_runtime(self, timeout: Optional[float] = None, device=None):
            decode, seen_handles, put_back = [], set(), []

            def take(task) -> None:
                if self._is_decode(task):
                    handles = {h for info in task.args[2] for h in info.cache_handles}
                    if len(decode) >= self.max_sessions or handles & seen_handles:
                        put_back.append(task)  # next iteration (never two steps of one session at once)
                        return
                    seen_handles.update(handles)
                    decode.append(task)
                    self.batch_receiver.recv()  # one token per task leaves the pool now
                else:
                    self._prefills.append(_Prefill(task))  # its token leaves with its last chunk

            if not self._prefills:
                take(self._ordered_tasks.get(block=True, timeout=timeout))
            while True:
                try:
                    take(self._ordered_tasks.get_nowait())
                except queue.Empty:
                    break
            if decode and not self._prefills and self.batch_wait_s > 0:
                # Sessions that shared the previous pass with these (kept in phase by their client: the
                # coordinator's LM-head batcher) send their next steps within milliseconds of each other: wait
                # (up to batch_wait_ms) for them, so they share this pass instead of queueing behind it. Any other
                # session that stepped in the last second gets a short wait (RECENT_WAIT_MS): enough for sessions
                # that happen to arrive together to share a pass and so become mates, never a long wait for a
                # session of another phase (another client).
                start = time.monotonic()
                mates_deadline = start + self.batch_wait_s
                recent_deadline = start + min(self.batch_wait_s, RECENT_WAIT_MS / 1000.0)
                while len(decode) < self.max_sessions and not self._prefills and not put_back:
                    now = time.monotonic()
                    self._forget_idle_sessions(now)
                    if self._missing_mates(decode):
                        deadline = mates_deadline
                    elif len(decode) < len(self._mates):  # the sessions that stepped in the last second
                        deadline = recent_deadline
                    else:
                        break
                    remaining = deadline - now
                    if remaining <= 0:
                        break
                    try:
                        take(self._ordered_tasks.get(timeout=remaining))
                    except queue.Empty:
                        break
                while True:  # and whatever else arrived meanwhile
                    try:
                        take(self._ordered_tasks.get_nowait())
                    except queue.Empty:
                        break
            now = time.monotonic()
            keys = frozenset(self._session_key(task) for task in decode)
            for key in keys:
                self._mates[key] = (now, keys)
            for task in put_back:
                self._ordered_tasks.put(task)
            work = _Work(decode=decode)
            if self._prefills:
                prefill = self._prefills[0]
                hidden = prefill.task.args[0]
                work.prefill = prefill
                work.prefill_last = (not self._chunkable(prefill.task)
                                     or prefill.offset + self._chunk_length(hidden) >= hidden.shape[1])
                if work.prefill_last:
                    self._prefills.popleft()
                    self.batch_receiver.recv()
            if not self._ordered_tasks.empty():
                first: Any = self._ordered_tasks.queue[0]
                self.priority = (first.priority, first.time_submitted)
            work_id = next(self._work_ids)
            self._works[work_id] = work
            return work_id, [work]

        def _chunk_length(self, hidden: torch.Tensor) -> int:
            return max(1, self.prefill_chunk_tokens // max(1, hidden.shape[0]))

        def _chunkable(self, task) -> bool:
            from petals.utils.misc import is_dummy

            hidden, hypo_ids, _infos, *prompts = task.args
            return hidden.ndim == 3 and is_dummy(hypo_ids) and all(p is None for p in prompts)

        # -- running work (runtime thread) --------------------------------------------------------------------
        def _process(self, work: _Work):
            if work.decode:
                self._run_decode(work.decode, work.results)
            if work.prefill is not None:
                self._run_prefill_chunk(work)
            size = len(work.decode) + (1 if work.prefill is not None else 0)
            return torch.empty(size), work  # Runtime reads outputs[0].size(0) as the batch size

        def _run_prefill_chunk(self, work: _Work) -> None:
            from petals.data_structures import InferenceMetadata

            prefill = work.prefill
            task = prefill.task
            try:
                if not self._chunkable(task):
                    self.stats.add("other_steps")
                    work.results.append((task, self._petals_step(*task.args)))
                    return
                hidden, hypo_ids, infos, *prompts = task.args
                length = self._chunk_length(hidden)
                offset = prefill.offset
                chunk_infos = tuple(InferenceMetadata(i.uid, i.prefix_length + offset, i.cache_handles,
                                                      i.active_adapter) for i in infos)
                (out,) = self._petals_step(hidden[:, offset:offset + length], hypo_ids, chunk_infos, *prompts)
                self.stats.add("prefill_chunks")
                prefill.outputs.append(out)
                prefill.offset = offset + length
                if work.prefill_last:
                    self.stats.add("other_steps")
                    result = prefill.outputs[0] if len(prefill.outputs) == 1 else torch.cat(prefill.outputs, dim=1)
                    work.results.append((task, (result,)))
            except Exception as error:
                self.stats.add("failed_steps")
                if not work.prefill_last:  # stop the chunks of a failed prefill now
                    try:
                        self._prefills.remove(prefill)
                        self.batch_receiver.recv()
                    except ValueError:
                        pass
                work.prefill_last = True
                work.results.append((task, error))

        def _session_caches(self, task) -> list:
            """Per block: (key, value) cache tensors of this task's session; raises if any is gone."""
            hidden, _hypo, infos, *_ = task.args
            caches = []
            for info in infos:
                backend = self.backends[info.uid]
                with backend.memory_cache.use_cache(*info.cache_handles) as tensors:
                    key, value = tensors
                if key.shape[0] != hidden.shape[0]:
                    raise ValueError(f"batch size {hidden.shape[0]} does not match the session's cache ({key.shape[0]})")
                if info.prefix_length + 1 > key.shape[-1]:
                    raise ValueError(f"prefix {info.prefix_length} + 1 exceeds the session's cache ({key.shape[-1]})")
                caches.append((key, value))
            return caches

        def _run_decode(self, tasks: list, results: list) -> None:
            groups: dict[tuple, list] = {}
            for task in tasks:
                try:
                    caches = self._session_caches(task)
                except Exception as error:  # e.g. KeyError: the client vanished and its cache was freed
                    self.stats.add("failed_steps")
                    results.append((task, error))
                    continue
                groups.setdefault(tuple(info.uid for info in task.args[2]), []).append((task, caches))
            for chain, members in groups.items():
                try:
                    outputs = self._decode_chain(chain, members)
                    self.stats.record_batch(len(members))
                    results.extend(zip((task for task, _ in members), outputs))
                except Exception as error:
                    logger.warning("batched decode of %d sessions failed (%r); running them one by one",
                                   len(members), error)
                    self.stats.add("isolated_reruns")
                    for task, _caches in members:
                        try:
                            results.append((task, self._petals_step(*task.args)))
                            self.stats.add("other_steps")
                        except Exception as single_error:
                            self.stats.add("failed_steps")
                            results.append((task, single_error))

        def _decode_chain(self, chain: tuple, members: list) -> list:
            dtype = self.backends[chain[0]].dtype
            hidden = torch.cat([task.args[0].to(dtype) for task, _ in members], dim=0)
            bounds = list(itertools.accumulate([task.args[0].shape[0] for task, _ in members], initial=0))
            for block_index, uid in enumerate(chain):
                layer = self.backends[uid].module.module_shards[0]
                sessions = [SessionSlice(bounds[i], bounds[i + 1], task.args[2][block_index].prefix_length,
                                         *caches[block_index]) for i, (task, caches) in enumerate(members)]
                hidden = llama_decode_batch(layer, hidden, sessions)
            return [(hidden[bounds[i]:bounds[i + 1]].clone(),) for i in range(len(members))]

        # -- delivering results (sender thread) ---------------------------------------------------------------
        def send_outputs_from_runtime(self, uid: int, batch_outputs) -> None:
            work = self._works.pop(uid, None)
            if work is None:
                logger.error("batching pool: no work %s to deliver", uid)
                return
            for task, result in work.results:
                try:
                    if isinstance(result, BaseException):
                        task.future.set_exception(result)
                    else:
                        crosses = getattr(task.future, "_origin_pid", os.getpid()) != os.getpid()  # to a handler
                        task.future.set_result([_result_for_handler(t) if crosses else t for t in result])
                except Exception as error:  # a future whose handler is gone must not hurt the others
                    logger.debug("batching pool: could not deliver a result: %r", error)

        def send_exception_from_runtime(self, uid: int, exception: BaseException) -> None:
            work = self._works.pop(uid, None)
            if work is None:
                return
            done = {id(task) for task, _ in work.results}
            tasks = [task for task, _ in work.results] + [t for t in work.decode if id(t) not in done]
            if work.prefill is not None and work.prefill_last and id(work.prefill.task) not in done:
                tasks.append(work.prefill.task)
            for task in tasks:
                try:
                    task.future.set_exception(exception)
                except Exception:
                    pass

    return BatchingInferencePool


_POOL_CLASS = None


def pool_class():
    global _POOL_CLASS
    if _POOL_CLASS is None:
        _POOL_CLASS = _make_pool_class()
    return _POOL_CLASS


_installed: dict = {}


def install(*, max_sessions: int = DEFAULT_MAX_SESSIONS, prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS,
            batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS):
    """Make Petals' ModuleContainer use :class:`BatchingInferencePool` for every server made in this process."""
    import petals.server.backend as backend_module
    import petals.server.server as server_module

    original = _installed.setdefault("original", server_module.merge_inference_pools_inplace)
    cls = pool_class()

    def merge_inference_pools_inplace(backends: dict) -> None:
        first_pool = next(iter(backends.values())).inference_pool
        pool = cls(backends, max_batch_size=first_pool.max_batch_size, device=first_pool.device,
                   max_sessions=max_sessions, prefill_chunk_tokens=prefill_chunk_tokens,
                   batch_wait_ms=batch_wait_ms)
        for backend in backends.values():
            assert not backend.inference_pool.is_alive()
            backend.inference_pool = pool

    merge_inference_pools_inplace._far_mesh_original = original
    server_module.merge_inference_pools_inplace = merge_inference_pools_inplace
    backend_module.merge_inference_pools_inplace = merge_inference_pools_inplace

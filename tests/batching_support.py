"""In-process Petals backends (no network) for the batching tests: real blocks, a real MemoryCache whose
sessions are allocated by hand, and a driver that plays the runtime's part for a task pool."""

from __future__ import annotations

import itertools
from pathlib import Path

from services.common import petals_adapter  # noqa: F401  (before petals)

import torch


class Backends:
    def __init__(self, model_dir: Path, block_indices, prefix: str = "m"):
        from hivemind import BatchTensorDescriptor
        from petals.server.backend import TransformerBackend
        from petals.server.from_pretrained import load_pretrained_block
        from petals.server.memory_cache import MemoryCache
        from petals.utils.auto_config import AutoDistributedConfig
        from petals.utils.convert_block import QuantType, convert_block

        self.config = AutoDistributedConfig.from_pretrained(model_dir)
        self.memory_cache = MemoryCache(None)
        self._handles = itertools.count()
        self.backends = {}
        hidden = self.config.hidden_size
        for index in block_indices:
            block = load_pretrained_block(str(model_dir), index, config=self.config, torch_dtype=torch.float32)
            block = convert_block(block, index, self.config, [torch.device("cpu")], torch.device("cpu"),
                                  QuantType.NONE, adapters=(), freeze=True)
            uid = f"{prefix}.{index}"
            self.backends[uid] = TransformerBackend(
                uid, block, config=self.config, memory_cache=self.memory_cache, backend_dtype=torch.float32,
                max_chunk_size_bytes=256 * 1024 * 1024,
                args_schema=(BatchTensorDescriptor(1, 2048, hidden, dtype=torch.float32),), kwargs_schema={},
                outputs_schema=(BatchTensorDescriptor(1, 2048, hidden, dtype=torch.float32),),
                min_batch_size=1, max_batch_size=8192)
        self.uids = list(self.backends)

    def allocate(self, batch_size: int = 1, max_length: int = 128) -> list[tuple[int, ...]]:
        """A session's cache handles, one tuple per block (as the handler allocates them)."""
        per_block = []
        for backend in self.backends.values():
            handles = []
            for descr in backend.get_inference_cache_descriptors(batch_size, max_length):
                handle = next(self._handles)
                self.memory_cache._allocated_tensors[handle] = descr.make_zeros()
                handles.append(handle)
            per_block.append(tuple(handles))
        return per_block

    def free(self, handles_per_block) -> None:
        for handles in handles_per_block:
            for handle in handles:
                self.memory_cache._allocated_tensors.pop(handle, None)

    def copy_session(self, handles_per_block) -> list[tuple[int, ...]]:
        """A second session whose caches are copies of this one's (for reference runs)."""
        copies = []
        for handles in handles_per_block:
            new = []
            for handle in handles:
                fresh = next(self._handles)
                self.memory_cache._allocated_tensors[fresh] = self.memory_cache._allocated_tensors[handle].clone()
                new.append(fresh)
            copies.append(tuple(new))
        return copies

    def infos(self, handles_per_block, prefix_length: int):
        from petals.data_structures import InferenceMetadata

        return tuple(InferenceMetadata(uid, prefix_length, handles, "")
                     for uid, handles in zip(self.uids, handles_per_block))

    def petals_step(self, hidden, handles_per_block, prefix_length: int) -> torch.Tensor:
        """Petals' own merged step (the reference path)."""
        from petals.server.backend import _MergedInferenceStep
        from petals.utils.misc import DUMMY_INT64

        step = _MergedInferenceStep(self.backends)
        (out,) = step(hidden.clone(), DUMMY_INT64, self.infos(handles_per_block, prefix_length),
                      *([None] * len(self.uids)))
        return out


def drive(pool, max_iterations: int = 1000) -> int:
    """Play the runtime: load work while the pool has any, process it, deliver results; returns iterations."""
    iterations = 0
    while not pool.empty and iterations < max_iterations:
        uid, batch = pool.load_batch_to_runtime()
        try:
            outputs = pool.process_func(*batch)
        except BaseException as error:  # as hivemind's Runtime does
            pool.send_exception_from_runtime(uid, error)
        else:
            pool.send_outputs_from_runtime(uid, outputs)
        iterations += 1
    return iterations


def submit_local(pool, *args, priority: float = 0.0):
    """Queue a task as the pool's own thread would after a handler's ``submit_task`` (in-process: a plain
    Future; an MPFuture's result only travels between processes)."""
    import time
    from concurrent.futures import Future

    from petals.server.task_pool import Task

    task = Task(priority, time.monotonic(), Future(), args)
    task.future._uid = id(task.future)
    pool._ordered_tasks.put(task)
    pool.batch_sender.send(None)
    return task.future

"""A scripted engine for the coordinator (services/coordinator/engine_protocol.py), for tests without a swarm.

``ScriptedModel`` conforms to ``EngineModel``: it uses a real tokenizer (the tiny model's) for prompts, chat
templates and the text stream, and its generations follow a ``Script``: which text to generate, how long each step
takes, at which step to fail (and with what) or to hang, and which servers compute each step (metered into the
``WorkMeter`` by the accounting rule, prefill included, as the Petals engine does). Generations step exactly as
engine.Generation does: the cancel event is checked before each step, and a step that finishes after a cancel does
not emit its token.

``scripted_engine(model, readiness)`` is an engine factory for ``create_app(settings, engine_factory=...)``.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from services.common.coverage import compute_coverage
from services.coordinator.engine_protocol import (Engine, EngineFactory, FailoverEvent, ReplacedServerInfo,
                                                  RouteHop, TokenDelta)
from services.coordinator.sampling import TokenLogprob
from services.coordinator.metering import WorkMeter
from services.coordinator.sampling import SamplingParams, TextStream, token_logprob

NUM_BLOCKS = 4
DEFAULT_ROUTE = (("QmScriptedA", 0, 2), ("QmScriptedB", 2, 4))
HANG_LIMIT_S = 60.0  # a hung step waits for its cancel at most this long (every wait here is bounded)


@dataclass
class Script:
    """What the next generations do. ``fail_at``/``hang_at`` are 1-based token numbers: the step that would
    produce that token raises ``error()`` / blocks until the generation is cancelled."""

    text: str = "hello world, hello mesh"  # generated token by token (cut at max_tokens); then EOS
    step_s: float = 0.0  # duration of each step (a step is not interrupted by a cancel, as in Petals)
    fail_at: Optional[int] = None
    error: Callable[[], BaseException] = lambda: RuntimeError(
        "hivemind.p2p.P2PDaemonError: peer QmSecretPeer at /ip4/10.0.0.7/tcp/31337 refused")
    failover: Optional[FailoverEvent] = None  # reported to the failover listeners before the failure
    hang_at: Optional[int] = None
    hold: Optional[threading.Event] = None  # the first step waits for this event (a slow start; bounded)
    route: tuple = DEFAULT_ROUTE  # ((peer_id, start_block, end_block), ...) computing every step
    eos: bool = True  # end with the tokenizer's EOS after the text (finish_reason "eos") when max_tokens allows


@dataclass
class Started:
    """A generation the model started (for tests: order of admission, cancel delivery)."""

    prompt_ids: list
    params: SamplingParams
    cancel: threading.Event
    generation: Optional["ScriptedGeneration"] = None


class ScriptedGeneration:
    def __init__(self, model: "ScriptedModel", script: Script, prompt_ids: list[int], params: SamplingParams,
                 meter: WorkMeter, cancel: threading.Event):
        self.model, self.script, self.params, self.meter, self.cancel = model, script, params, meter, cancel
        self.prompt_ids = prompt_ids
        self.text = TextStream(model.tokenizer, params.stop)
        self.token_ids: list[int] = []
        self.finish_reason: Optional[str] = None
        self.failovers: list[FailoverEvent] = []
        output = model.tokenizer(script.text, add_special_tokens=False).input_ids
        self._output = list(output) + ([model.tokenizer.eos_token_id] if script.eos else [])

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def route(self) -> list[RouteHop]:
        return [{"peer_id": peer, "blocks": f"{start}:{end}"} for peer, start, end in self.script.route]

    def replaced_servers(self) -> list[ReplacedServerInfo]:
        return [{"peer_id": e["peer_id"], "blocks": e["blocks"], "cause": e["cause"], "replaced_by": e["replaced_by"],
                 "stall_ms": None if e["stall_s"] is None else round(e["stall_s"] * 1000, 1)}
                for e in list(self.failovers)]

    def _step(self, number: int) -> int:
        """One step producing token ``number``: the servers' work is metered, the script's delay, hang or failure."""
        script = self.script
        if number == 1 and script.hold is not None:
            script.hold.wait(HANG_LIMIT_S)
        if script.hang_at == number:
            self.cancel.wait(HANG_LIMIT_S)  # a server that never answers: only a cancel ends the wait
            if self.cancel.is_set():
                return -1  # no step completed (nothing metered); the caller sees the cancel and ends
        if script.fail_at == number:
            if script.failover is not None:
                self.failovers.append(script.failover)
                for listener in self.model.failure_listeners:
                    listener(script.failover["peer_id"])
                for listener in self.model.failover_listeners:
                    listener(script.failover)
            raise script.error()
        if script.step_s:
            time.sleep(script.step_s)
        positions = len(self.prompt_ids) if number == 1 else 1
        for peer, start, end in script.route:
            self.meter.record(peer, start, end, positions)
        return self._output[(number - 1) % len(self._output)]

    def _logprob(self, token_id: int) -> Optional[TokenLogprob]:
        """When asked for: the log-probabilities of ``scripted_logits`` at this step (the real computation)."""
        if self.params.logprobs is None:
            return None
        logits = scripted_logits(len(self.token_ids), token_id, len(self.model.tokenizer))
        return token_logprob(logits, token_id, self.params.logprobs)

    def __iter__(self) -> Iterator[TokenDelta]:
        eos = self.model.tokenizer.eos_token_id
        while True:  # bounded: every pass appends a token and max_tokens ends it
            if self.cancel.is_set():
                self.finish_reason = "cancelled"
                return
            token_id = self._step(len(self.token_ids) + 1)
            if self.cancel.is_set():  # the step finished after a cancel: its token is not used
                self.finish_reason = "cancelled"
                return
            self.token_ids.append(token_id)
            delta, finish = self.text.accept(token_id, count=len(self.token_ids), max_tokens=self.params.max_tokens,
                                             end_of_generation=token_id == eos)
            if delta is not None:
                yield TokenDelta(len(self.token_ids), token_id, delta, self._logprob(token_id))
            if finish is not None:
                self.finish_reason = finish
                return


def scripted_logits(step: int, token_id: int, vocabulary: int):
    """The logits a scripted step "computed": seeded noise over the vocabulary, the scripted token the largest."""
    import torch

    logits = torch.randn(vocabulary, generator=torch.Generator().manual_seed(step), dtype=torch.float64) * 3
    logits[token_id] = logits.max() + 0.5
    return logits


class ScriptedModel:
    """An ``EngineModel`` whose generations follow ``script`` (a test sets it; each generation copies it at start)."""

    def __init__(self, model_id: str, tokenizer, *, context_length: int = 256, script: Optional[Script] = None):
        self.model_id = model_id
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.script = script or Script()
        self.failure_listeners: list = []
        self.failover_listeners: list = []
        self.started: list[Started] = []
        self.encode_threads: list[str] = []  # the thread of every encode (the serving layer tokenizes off the loop)
        self.shut_down = False

    def encode(self, prompt: str) -> list[int]:
        self.encode_threads.append(threading.current_thread().name)
        return list(self.tokenizer(prompt).input_ids)

    def start(self, prompt_ids: list[int], params: SamplingParams, meter: WorkMeter,
              cancel: Optional[threading.Event] = None) -> ScriptedGeneration:
        started = Started(list(prompt_ids), params, cancel or threading.Event())
        generation = ScriptedGeneration(self, self.script, prompt_ids, params, meter, started.cancel)
        started.generation = generation
        self.started.append(started)
        return generation

    def shutdown(self) -> None:
        self.shut_down = True


@dataclass(frozen=True)
class _Announced:  # services.common.coverage.AnnouncedServer
    peer_id: str
    state: str
    start_block: int
    end_block: int
    public_name: Optional[str] = None


class ScriptedReadiness:
    """The readiness gate over a scripted set of announced servers (the real coverage computation)."""

    def __init__(self, model_id: str, servers: tuple = DEFAULT_ROUTE, num_blocks: int = NUM_BLOCKS):
        self.model_id, self.servers, self.num_blocks = model_id, servers, num_blocks
        self.started = self.stopped = False

    async def current(self):
        per_block = [[_Announced(peer, "ONLINE", start, end) for peer, start, end in self.servers if start <= i < end]
                     for i in range(self.num_blocks)]
        now = time.time()
        return compute_coverage(self.model_id, self.num_blocks, per_block, now=now, observed_at=now)

    def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True


def scripted_engine(model: ScriptedModel, readiness: Optional[ScriptedReadiness] = None) -> EngineFactory:
    async def factory(settings, model_path) -> Engine:
        return Engine(model, readiness)

    return factory


@contextmanager
def serve_app(app, name: str) -> Iterator[str]:
    """Serve an ASGI app (its lifespan included) with uvicorn in a thread of its own, with its own event loop, on a
    free loopback port; yields its URL and stops it on exit."""
    import uvicorn

    from infra.embedded import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, f"{name} did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
    assert not thread.is_alive(), f"{name} did not stop"

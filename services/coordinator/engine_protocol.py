"""The engine seam of the coordinator: what the serving layer needs from a model and a generation (typed, pure).

The serving layer (services/coordinator/serving.py) only talks to these protocols. The production engine is the
Petals client (services/coordinator/engine.py: ``SwarmModel`` / ``Generation``, built by ``swarm_engine`` in
services/coordinator/app.py); tests run the same HTTP app over a scripted engine (tests/scripted_engine.py) that
needs no swarm. ``create_app(settings, engine_factory=...)`` picks one.

A generation is synchronous (the serving layer iterates it in a worker thread) and is stopped by setting the
``cancel`` event it was started with: it checks the event between steps and ends with ``finish_reason =
"cancelled"``. It raises to fail: ``petals_adapter.SwarmUnavailable`` maps to 503 ``swarm_unavailable``, any other
exception to 502 ``swarm_error`` (the raw error is logged, never sent to the client).

This module imports no petals (and no torch).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator, Optional, Protocol, TypedDict, runtime_checkable

from services.common.states import FinishReason

if TYPE_CHECKING:  # sampling imports torch
    from services.coordinator.metering import WorkMeter
    from services.coordinator.sampling import SamplingParams, TokenLogprob


@dataclass(frozen=True)
class TokenDelta:
    """One generated token, as a generation yields it."""

    index: int  # 1-based count of generated tokens
    token_id: int
    text: str  # may be "" (held back for a stop sequence / incomplete UTF-8)
    logprob: Optional[TokenLogprob] = None  # when the request asked for logprobs


class FailoverEvent(TypedDict):
    """A server that failed a step (the payload of petals_adapter's ``on_failover`` hook)."""

    peer_id: str
    blocks: str  # "2:4"
    cause: str  # "died" | "hung" | "refused"
    error: str
    replaced_by: Optional[str]  # None: no live server could take the blocks
    stall_s: Optional[float]


class ReplacedServerInfo(TypedDict):
    """``Generation.replaced_servers()`` items (protocol.ReplacedServer on the wire)."""

    peer_id: str
    blocks: str
    cause: str
    replaced_by: Optional[str]
    stall_ms: Optional[float]


class RouteHop(TypedDict):
    peer_id: str
    blocks: str  # "0:2"


FailureListener = Callable[[str], None]  # the peer ID of a failed server request (from the generation's thread)
FailoverListener = Callable[[FailoverEvent], None]  # every failover of any generation (from its thread)


class EmittedText(Protocol):
    """The generation's detokenizer (sampling.TextStream): the text handed out so far."""

    @property
    def emitted(self) -> str: ...


@runtime_checkable
class EngineGeneration(Protocol):
    """One running generation: iterate it for ``TokenDelta``; the rest is read after (or while) it runs."""

    finish_reason: Optional[FinishReason]  # None while running or after a failure
    cancel: threading.Event
    text: EmittedText

    def __iter__(self) -> Iterator[TokenDelta]: ...

    @property
    def completion_tokens(self) -> int: ...

    def route(self) -> list[RouteHop]: ...

    def replaced_servers(self) -> list[ReplacedServerInfo]: ...


@runtime_checkable
class EngineModel(Protocol):
    """One served model: tokenizer, limits, and ``start`` of generations metered into a ``WorkMeter``."""

    model_id: str
    tokenizer: Any  # a Hugging Face tokenizer (chat template, decode)
    context_length: int
    failure_listeners: list[FailureListener]
    failover_listeners: list[FailoverListener]

    def encode(self, prompt: str) -> list[int]: ...

    def start(self, prompt_ids: list[int], params: SamplingParams, meter: WorkMeter,
              cancel: Optional[threading.Event] = None) -> EngineGeneration: ...

    def shutdown(self) -> None: ...


@runtime_checkable
class Quarantinable(Protocol):
    """An optional capability of an ``EngineModel`` that routes through other peers' servers (engine.SwarmModel):
    its steps can be spot-checked, and a peer that fails the checks is quarantined (no route goes through it) until
    the quarantine is lifted. The coordinator runs spot checks and the quarantine sync only for such a model."""

    model_id: str
    quarantined: set[str]
    sequence_manager: Any  # the Petals client's RemoteSequenceManager (the spot checks re-run steps through it)
    spot_checker: Any  # verification.SpotChecker, once spot checks are on

    def quarantine(self, peer_id: str) -> None: ...

    def unquarantine(self, peer_id: str) -> None: ...


class Readiness(Protocol):
    """Whether a model can serve now (readiness.SwarmReadiness): ``current()`` is a services.common.coverage
    ``Coverage`` (``swarm_ready``, ``missing_blocks``, ``loading_blocks``, ``blocking``)."""

    async def current(self) -> Any: ...

    def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class Engine:
    """What an engine factory builds in the coordinator's lifespan: the model and its readiness gate (None: always
    ready). The lifespan starts the readiness and, at shutdown, stops it and then ``model.shutdown()``."""

    model: EngineModel
    readiness: Optional[Readiness] = None


# (settings, model_path) -> Engine, awaited inside the lifespan (may block in a thread: loading a model)
EngineFactory = Callable[[Any, Any], Awaitable[Engine]]

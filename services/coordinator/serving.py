"""Serving logic of ``/mesh/inference/generate``: validation, the generation thread, metering, billing.

Routes stay thin (api/routes.py); this module knows nothing about HTTP except the ``ServingError`` status.
A generation runs in a worker thread (the Petals client is synchronous); tokens come back to the event loop
through an ``asyncio.Queue``. Contributions are checkpointed while the stream runs and the session is
finalized exactly once (``finalize_session()`` in SQL), whatever way the stream ends.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from typing import AsyncIterator, Optional

from services.common.logs import get_logger
from services.common.money import format_far, session_cost
from services.coordinator.metering import WorkMeter
from services.coordinator.protocol import Contribution, DoneEvent, GenerateRequest, TokenEvent, Usage
from services.coordinator.sampling import SamplingParams
from services.coordinator.store import DuplicateRequest, FinalSession, Pricing, SessionStore

log = get_logger(__name__)

CHECKPOINT_EVERY_TOKENS = 8
CHECKPOINT_EVERY_SECONDS = 1.0
_DONE = object()


class ServingError(Exception):
    def __init__(self, status: int, code: str, message: str, *, headers: Optional[dict] = None, **extra):
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.extra = status, code, message, headers or {}, extra

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


@dataclass
class ActiveGeneration:
    request_id: str
    session_id: str
    model_id: str
    prompt_tokens: int
    cancel: threading.Event = field(default_factory=threading.Event)
    generation: object = None
    tokens_generated: int = 0
    started_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class PreparedRequest:
    request_id: str
    model: object  # SwarmModel
    prompt_ids: list
    params: SamplingParams


class InferenceService:
    def __init__(self, *, store: SessionStore, models: dict, default_model_id: str, pricing: Pricing,
                 coordinator_id: str, max_workers: int = 32):
        self.store = store
        self.models = models
        self.default_model_id = default_model_id
        self.pricing = pricing
        self.coordinator_id = coordinator_id
        self.executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="generation")
        self.active: dict[str, ActiveGeneration] = {}

    def cost_of(self, completion_tokens: int, prompt_tokens: int) -> Decimal:
        return session_cost(completion_tokens, prompt_tokens, self.pricing.price_per_token_far,
                            self.pricing.price_per_prompt_token_far)

    def prepare(self, request: GenerateRequest) -> PreparedRequest:
        model_id = request.model_id or self.default_model_id
        model = self.models.get(model_id)
        if model is None:
            raise ServingError(404, "model_not_found", f"unknown model {model_id!r}; known: {sorted(self.models)}")
        prompt_ids = model.encode(request.prompt)
        context = model.context_length
        if len(prompt_ids) >= context:
            raise ServingError(400, "prompt_too_long",
                               f"the prompt has {len(prompt_ids)} tokens; the model's context is {context} tokens")
        if len(prompt_ids) + request.max_tokens > context:
            raise ServingError(
                400, "max_tokens_exceeds_context",
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({request.max_tokens}) exceeds the model's "
                f"context of {context} tokens; lower max_tokens to at most {context - len(prompt_ids)}")
        request_id = request.request_id or f"req_{uuid.uuid4().hex}"
        if request_id in self.active:
            raise ServingError(409, "duplicate_request", f"request {request_id!r} is already running")
        params = SamplingParams(max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
                                top_k=request.top_k, seed=request.seed, stop=tuple(request.stop))
        return PreparedRequest(request_id, model, prompt_ids, params)

    async def open_session(self, prepared: PreparedRequest, request: GenerateRequest) -> ActiveGeneration:
        try:
            session_id = await self.store.create_session(
                request_id=prepared.request_id, model_id=prepared.model.model_id, pricing=self.pricing,
                prompt_tokens=len(prepared.prompt_ids), user_wallet=request.user_wallet,
                coordinator_id=self.coordinator_id)
        except DuplicateRequest:
            raise ServingError(409, "duplicate_request",
                               f"request_id {prepared.request_id!r} was used before (it is an idempotency key)")
        active = ActiveGeneration(prepared.request_id, session_id, prepared.model.model_id, len(prepared.prompt_ids))
        self.active[prepared.request_id] = active
        return active

    async def run(self, prepared: PreparedRequest, active: ActiveGeneration) -> AsyncIterator[dict]:
        """Token events (dicts) then the final event. Cancelling the consumer cancels the generation."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        meter = WorkMeter()
        generation = prepared.model.start(prepared.prompt_ids, prepared.params, meter, active.cancel)
        active.generation = generation

        def worker() -> None:
            try:
                for delta in generation:
                    loop.call_soon_threadsafe(queue.put_nowait, delta)
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)
            except BaseException as error:  # noqa: BLE001 - handed to the event loop
                loop.call_soon_threadsafe(queue.put_nowait, error)

        future = loop.run_in_executor(self.executor, worker)
        status, failure = "completed", None
        last_checkpoint = (0, time.monotonic())
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    status, failure = "failed", item
                    break
                active.tokens_generated = item.index
                yield TokenEvent(token=item.text, request_id=active.request_id, tokens_generated=item.index,
                                 cost_far=format_far(self.cost_of(item.index, active.prompt_tokens))).model_dump()
                if (item.index - last_checkpoint[0] >= CHECKPOINT_EVERY_TOKENS
                        or time.monotonic() - last_checkpoint[1] >= CHECKPOINT_EVERY_SECONDS):
                    await self.store.checkpoint(active.session_id, item.index, meter.snapshot())
                    last_checkpoint = (item.index, time.monotonic())
            await future
        finally:
            if not future.done():  # the consumer went away (client disconnected or cancelled): stop and settle
                active.cancel.set()
                await asyncio.shield(future)
            final = await asyncio.shield(self._settle(active, generation, meter, status))
            self.active.pop(active.request_id, None)
        if failure is not None:
            log.error("generation failed", request_id=active.request_id, error=repr(failure))
            raise ServingError(502, "swarm_error", f"generation through the swarm failed: {failure!r}",
                               tokens_generated=generation.completion_tokens)
        yield self.done_event(final, generation.finish_reason or "length", generation.text.emitted)

    async def _settle(self, active: ActiveGeneration, generation, meter: WorkMeter, status: str) -> FinalSession:
        if generation.finish_reason == "cancelled":
            status = "cancelled"
        await self.store.checkpoint(active.session_id, generation.completion_tokens, meter.snapshot())
        return await self.store.finalize(active.session_id, status=status, finish_reason=generation.finish_reason,
                                         prompt_tokens=active.prompt_tokens,
                                         completion_tokens=generation.completion_tokens)

    @staticmethod
    def done_event(final: FinalSession, finish_reason: str, text: str) -> dict:
        return DoneEvent(
            request_id=final.request_id, finish_reason=finish_reason, text=text,
            usage=Usage(prompt_tokens=final.prompt_tokens, completion_tokens=final.completion_tokens),
            cost_far=format_far(final.cost_far), fee_far=format_far(final.fee_far),
            contributions=[Contribution(node_id=c.node_id, peer_id=c.peer_id, wallet_address=c.wallet_address,
                                        blocks=c.blocks, work_units=c.work_units,
                                        payment_far=format_far(c.payment_far)) for c in final.contributions],
        ).model_dump()

    def cancel(self, request_id: str) -> bool:
        active = self.active.get(request_id)
        if active is None:
            return False
        active.cancel.set()
        return True

    def shutdown(self) -> None:
        for active in self.active.values():
            active.cancel.set()
        self.executor.shutdown(wait=True, cancel_futures=True)

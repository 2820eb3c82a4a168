"""Serving logic of the generate APIs: admission, validation, the generation thread, metering, billing.

Routes stay thin (api/routes.py, api/openai_routes.py); this module knows nothing about HTTP except the
``ServingError`` status. Order of admission: credentials (401) → rate limit (429) → input (400/404/422) → swarm
readiness (503, immediate) → idempotency (replay or 409) → prepaid balance (402, reserved atomically with the
session row). When the swarm is not ready and the model has a fallback API (FALLBACK_ENDPOINTS), the request is
served there instead of the 503 (services/coordinator/fallback.py; charged at the fallback price, no contributions).
A generation runs in a worker thread (the Petals client is synchronous); tokens come back to the
event loop through an ``asyncio.Queue``. Contributions are checkpointed while the stream runs and the session
is finalized exactly once (``finalize_session()`` in SQL), whatever way the stream ends.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import AsyncIterator, Optional

from services.common.logs import get_logger
from services.common.money import format_far, session_cost
from services.common.petals_adapter import SwarmUnavailable
from services.common.states import FinishReason, ServedBy, SessionStatus
from services.coordinator import metrics
from services.coordinator.account_service import AccountService
from services.coordinator.admission import AdmissionGate, Overloaded, TokenizerPool
from services.coordinator.choices import ChoiceGenerations, choice_seed
from services.coordinator.engine_protocol import EngineGeneration, EngineModel, Readiness
from services.coordinator.errors import ServingError, rate_limited
from services.coordinator.accounts import AccountStore, AuthError, Principal, jwt_secret_problem
from services.coordinator.fallback import FallbackClient, FallbackFailed, billed_tokens, finish_reason_of
from services.coordinator.metering import WorkMeter
from services.coordinator.openai_protocol import render_chat
from services.coordinator.protocol import (ChoiceResult, Contribution, DoneEvent, GenerateRequest, LogprobEntry,
                                           PromptTokensDetails, ReplacedServer, StreamEvent, TokenEvent, TopLogprob,
                                           Usage)
from services.coordinator.ratelimit import RateLimiter
from services.coordinator.route_cost import expected_ms_per_token
from services.coordinator.sampling import SamplingParams, TokenPieces, sampling_defaults
from services.coordinator.store import DuplicateRequest, FinalSession, InsufficientBalance, Pricing, SessionStore
from services.coordinator.structured import UnsupportedSchema, grammar_for_response_format
from services.coordinator.tools import ToolSpec

log = get_logger(__name__)

# A prompt longer than context_length × this many characters cannot fit the context (no token of the models
# served is longer), so it is refused before tokenizing it (docs/generation.md "Limits").
MAX_CHARS_PER_TOKEN = 16
CHECKPOINT_EVERY_TOKENS = 8
CHECKPOINT_EVERY_SECONDS = 1.0
SWARM_RETRY_AFTER_S = 5
# Saving a finished session (last checkpoint + finalize) is retried this many times, waiting FINALIZE_BACKOFF_S,
# then twice as long each time (0.25 + 0.5 + 1 + 2 s); a session still unsaved is left to the stale-session sweep.
FINALIZE_ATTEMPTS = 5
FINALIZE_BACKOFF_S = 0.25
_DONE = object()


def _count_failover(model_id: str, event: dict) -> None:
    recovered = event["replaced_by"] is not None
    metrics.FAILOVERS.labels(model_id, event["cause"], "true" if recovered else "false").inc()
    if recovered:
        metrics.FAILOVER_STALL.labels(model_id, event["cause"]).observe(event["stall_s"])
    log.warning("server failed a step", model_id=model_id, peer_id=event["peer_id"], blocks=event["blocks"],
                cause=event["cause"], replaced_by=event["replaced_by"], stall_s=event["stall_s"], error=event["error"])


def _grammar(request: GenerateRequest, tools: Optional[ToolSpec]) -> Optional[str]:
    """The grammar that constrains the output (structured.py: response_format; tools.py: tool calls), or None;
    400 naming what cannot be enforced."""
    calls = tools is not None and tools.calls_allowed
    if calls and request.response_format is not None and request.response_format.type != "text":
        raise ServingError(400, "unsupported_parameter", "response_format together with tools that may be called "
                           "is not supported: send one of them (or tool_choice none)", param="response_format")
    try:
        return tools.grammar() if calls else grammar_for_response_format(request.response_format)
    except UnsupportedSchema as error:
        raise ServingError(400, "unsupported_schema", str(error) if calls else f"response_format: {error}") from None


def _tokenize(model, request: GenerateRequest, tools: Optional[ToolSpec] = None) -> tuple[list, list]:
    """(prompt token ids, stop sequences of the chat template); CPU-bound, run in a worker thread."""
    if request.messages is None:
        return model.encode(request.prompt), []
    prompt, template_stops = render_chat(model.tokenizer, request.messages, tools)
    return model.encode(prompt), template_stops


@dataclass
class ActiveGeneration:
    request_id: str
    session_id: str
    model_id: str
    prompt_tokens: int
    account_id: Optional[str]
    cancel: threading.Event = field(default_factory=threading.Event)
    generation: Optional[EngineGeneration] = None
    tokens_generated: int = 0
    started_at: float = field(default_factory=time.monotonic)
    release_slot: object = None  # the admission slot's release (services/coordinator/admission.py)
    pricing: Optional[Pricing] = None  # the session's prices (the fallback's when served there)
    served_by: ServedBy = ServedBy.SWARM


@dataclass(frozen=True)
class PreparedRequest:
    request_id: str
    request_id_given: bool
    model: EngineModel
    prompt_ids: list
    params: SamplingParams
    choices: int = 1  # n: continuations of the prompt, each billed for its own tokens (choices.py)

    @property
    def max_completion_tokens(self) -> int:
        """What the reservation covers: every choice generating max_tokens."""
        return self.params.max_tokens * self.choices


@dataclass(frozen=True)
class Replay:
    """A finished request asked for again with the same request_id: its stored result, nothing re-run."""

    final: FinalSession


@dataclass(frozen=True)
class ModelInfo:
    """A served model as /v1/models lists it."""

    model_id: str
    context_length: int
    coverage: object  # services.common.coverage.Coverage, or None (no readiness gate)
    fallback: bool  # a fallback API is configured (FALLBACK_ENDPOINTS)


class InferenceService:
    def __init__(self, *, store: SessionStore, accounts: AccountStore, limiter: Optional[RateLimiter],
                 models: dict[str, EngineModel], readiness: dict[str, Readiness], default_model_id: str,
                 pricing: Pricing, coordinator_id: str, jwt_secret: str,
                 generation_timeout_s: float = 600.0, max_workers: int = 64, deposit_info=None,
                 max_api_keys: int = 50, key_creations_per_day: int = 20, max_running: int = 16, max_waiting: int = 32,
                 max_queue_wait_s: float = 10.0, overloaded_retry_after_s: int = 2,
                 fallbacks: Optional[dict[str, FallbackClient]] = None):
        self.store = store
        self.accounts = accounts
        self.limiter = limiter
        self.models = models
        self.readiness = readiness
        self.default_model_id = default_model_id
        self.pricing = pricing
        self.coordinator_id = coordinator_id
        problem = jwt_secret_problem(jwt_secret)
        if problem:
            raise ValueError(problem)
        self.jwt_secret = jwt_secret
        self.generation_timeout_s = generation_timeout_s
        self.deposit_info = deposit_info  # account_service.DepositInfo: how to top up, shown in a 402
        self.fallbacks = fallbacks or {}  # model_id -> FallbackClient, used while that model's swarm is not ready
        self.max_api_keys = max_api_keys
        self.key_creations_per_day = key_creations_per_day
        self.executor = ThreadPoolExecutor(max_workers=max(max_workers, max_running * len(models) + 4),
                                           thread_name_prefix="generation")
        self.tokenizers = TokenizerPool()  # its own bounded threads, at most one per account at a time
        self.admission = {
            model_id: AdmissionGate(model_id, max_running=max_running, max_waiting=max_waiting,
                                    max_wait_s=max_queue_wait_s, retry_after_s=overloaded_retry_after_s,
                                    on_change=lambda gate: metrics.WAITING.labels(gate.model_id).set(gate.waiting))
            for model_id in models}
        # Running generations by (account_id, request_id): request ids are idempotency keys per account.
        self.active: dict[tuple[Optional[str], str], ActiveGeneration] = {}
        self._settlements: set[asyncio.Future] = set()
        self.sampling_defaults: dict[str, dict] = {}  # model_id -> its recommended sampling (filled on first use)
        self._token_pieces: dict[str, TokenPieces] = {}  # model_id -> token texts for logprobs
        for model in models.values():
            model.failover_listeners.append(lambda event, model_id=model.model_id: _count_failover(model_id, event))

    # ----------------------------------------------------------------------------------------- admission
    async def authenticate(self, authorization: Optional[str]) -> Principal:
        try:
            return await self.accounts.authenticate(authorization, self.jwt_secret)
        except AuthError as error:
            raise ServingError(401, "invalid_credentials", str(error), headers={"WWW-Authenticate": "Bearer"})

    async def admit(self, principal: Principal) -> None:
        if self.limiter is None:
            return
        decision, limit, whose = await self.limiter.admit(principal)
        if not decision.allowed:
            raise rate_limited(limit, decision.retry_after_s, whose=whose)

    def cost_of(self, completion_tokens: int, prompt_tokens: int, pricing: Optional[Pricing] = None) -> Decimal:
        pricing = pricing or self.pricing
        return session_cost(completion_tokens, prompt_tokens, pricing.price_per_token_far,
                            pricing.price_per_prompt_token_far)

    def model(self, model_id: Optional[str]) -> EngineModel:
        model_id = model_id or self.default_model_id
        model = self.models.get(model_id)
        if model is None:
            raise ServingError(404, "model_not_found", f"unknown model {model_id!r}; known: {sorted(self.models)}")
        return model

    async def prepare(self, request: GenerateRequest, tools: Optional[ToolSpec] = None,
                      account_id: Optional[str] = None) -> PreparedRequest:
        """Validate the input against the model. The prompt is bounded by characters first (cheap), then the chat
        template and the tokenizer run in a worker thread, never on the event loop."""
        model = self.model(request.model_id)
        context = model.context_length
        chars = len(request.prompt) if request.messages is None else sum(len(m.text()) for m in request.messages)
        max_chars = context * MAX_CHARS_PER_TOKEN
        if chars > max_chars:
            raise ServingError(400, "prompt_too_long",
                               f"the prompt has {chars} characters; the model's context of {context} tokens holds "
                               f"at most {max_chars} characters ({MAX_CHARS_PER_TOKEN} per token)",
                               max_prompt_chars=max_chars)
        if account_id is not None:
            await self.check_balance_floor(request, account_id)  # before tokenizing: an empty account costs no CPU
        grammar = await asyncio.to_thread(_grammar, request, tools)
        prompt_ids, template_stops = await self.tokenizers.run(account_id, _tokenize, model, request, tools)
        stops = list(request.stop) + [s for s in template_stops if s not in request.stop]
        if len(prompt_ids) >= context:
            raise ServingError(400, "prompt_too_long",
                               f"the prompt has {len(prompt_ids)} tokens; the model's context is {context} tokens")
        if len(prompt_ids) + request.max_tokens > context:
            raise ServingError(
                400, "max_tokens_exceeds_context",
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({request.max_tokens}) exceeds the model's "
                f"context of {context} tokens; lower max_tokens to at most {context - len(prompt_ids)}")
        params = self.sampling_params(model, request, tuple(stops), grammar)
        request_id = request.request_id or f"req_{uuid.uuid4().hex}"
        return PreparedRequest(request_id, request.request_id is not None, model, prompt_ids, params, request.n or 1)

    def sampling_params(self, model: EngineModel, request: GenerateRequest, stops: tuple,
                        grammar: Optional[str] = None) -> SamplingParams:
        """The request's sampling, each field it omits from the model's recommended settings; a logit_bias
        token outside the vocabulary is a 400. ``grammar``: the output's constraint (structured outputs, tools)."""
        defaults = self.sampling_defaults.get(model.model_id)
        if defaults is None:
            defaults = self.sampling_defaults[model.model_id] = sampling_defaults(
                model.model_id, getattr(model, "generation_config", None))
        bias = tuple((int(token), float(value)) for token, value in (request.logit_bias or {}).items())
        vocabulary = len(model.tokenizer) if bias else 0
        outside = [token for token, _ in bias if token >= vocabulary]
        if outside:
            raise ServingError(400, "invalid_logit_bias", f"logit_bias names token ids outside the vocabulary of "
                                                          f"{vocabulary} tokens: {outside[:5]}", param="logit_bias")

        def pick(name):
            value = getattr(request, name)
            return defaults[name] if value is None else value

        return SamplingParams(max_tokens=request.max_tokens, temperature=pick("temperature"), top_p=pick("top_p"),
                              top_k=pick("top_k"), repetition_penalty=pick("repetition_penalty"),
                              presence_penalty=request.presence_penalty or 0.0,
                              frequency_penalty=request.frequency_penalty or 0.0, logit_bias=bias,
                              logprobs=request.logprobs, seed=request.seed, stop=stops, grammar=grammar)

    async def gate(self, model: EngineModel) -> None:
        readiness = self.readiness.get(model.model_id)
        if readiness is None:
            return
        coverage = await readiness.current()
        if not coverage.swarm_ready:
            raise ServingError(
                503, "swarm_not_ready",
                f"model {model.model_id!r} cannot serve now: " + ("; ".join(coverage.blocking) or "blocks missing"),
                headers={"Retry-After": str(SWARM_RETRY_AFTER_S)}, missing_blocks=coverage.missing_blocks,
                loading_blocks=coverage.loading_blocks, retry_after_s=SWARM_RETRY_AFTER_S)

    async def route(self, model: EngineModel, *, swarm_only: bool = False) -> Optional[FallbackClient]:
        """None when the swarm serves; the model's fallback when its swarm is not ready; else 503 (gate).
        ``swarm_only``: the request asks for what only the swarm gives (log-probabilities), never the fallback."""
        try:
            await self.gate(model)
        except ServingError as error:
            fallback = self.fallbacks.get(model.model_id)
            if fallback is None or swarm_only:
                raise
            log.info("swarm not ready: serving from the fallback API", model_id=model.model_id,
                     upstream=fallback.host, reason=error.message)
            return fallback
        return None

    async def begin(self, prepared: PreparedRequest, request: GenerateRequest, principal: Optional[Principal],
                    fallback: Optional[FallbackClient] = None) -> ActiveGeneration | Replay:
        account_id = principal.account_id if principal else None
        key = (account_id, prepared.request_id)
        if key in self.active:
            raise ServingError(409, "request_in_progress", f"request {prepared.request_id!r} is running")
        pricing = fallback.pricing if fallback is not None else self.pricing
        reserved = (self.cost_of(prepared.max_completion_tokens, len(prepared.prompt_ids), pricing) if account_id
                    else Decimal(0))
        # Registered before the row is written, so a DELETE racing the start is never lost.
        active = ActiveGeneration(prepared.request_id, str(uuid.uuid4()), prepared.model.model_id,
                                  len(prepared.prompt_ids), account_id, pricing=pricing,
                                  served_by=ServedBy.SWARM if fallback is None else ServedBy.FALLBACK)
        self.active[key] = active
        try:
            await self.store.create_session(
                session_id=active.session_id, request_id=prepared.request_id, model_id=prepared.model.model_id,
                pricing=pricing, prompt_tokens=len(prepared.prompt_ids), user_wallet=request.user_wallet,
                account_id=account_id, reserved_far=reserved, coordinator_id=self.coordinator_id,
                served_by=active.served_by)
        except DuplicateRequest:  # the same account, racing (here or on another coordinator)
            self.active.pop(key, None)
            previous = await self.store.read_by_request_id(prepared.request_id, account_id)
            if previous is not None:
                return self.replay_of(previous)
            raise ServingError(409, "duplicate_request",
                               f"request_id {prepared.request_id!r} is already in use (it is an idempotency key)")
        except InsufficientBalance as error:
            self.active.pop(key, None)
            raise self._insufficient(account_id, prepared.max_completion_tokens, error.required,
                                     error.available) from None
        except BaseException:
            self.active.pop(key, None)
            raise
        return active

    async def check_balance_floor(self, request: GenerateRequest, account_id: str) -> None:
        """402 at once when the account cannot pay even ``max_tokens`` at the cheapest price this model may be
        served at, prompt not counted: a cheap query instead of a template + tokenizer run. The exact reservation
        (prompt included) is still taken atomically by ``begin``."""
        model_id = request.model_id or self.default_model_id
        prices = [self.pricing] + ([self.fallbacks[model_id].pricing] if model_id in self.fallbacks else [])
        max_tokens = request.max_tokens * (request.n or 1)  # every choice may run to max_tokens
        floor = min(self.cost_of(max_tokens, 0, pricing) for pricing in prices)
        row = await self.accounts.account(account_id)
        available = (row["balance_far"] - row["reserved_far"]) if row is not None else Decimal(0)
        if available < floor:
            raise self._insufficient(account_id, max_tokens, floor, available)

    def _insufficient(self, account_id: str, max_tokens: int, required: Decimal, available: Decimal) -> ServingError:
        short = required - available
        how = self.deposit_info.for_account(account_id, short) if self.deposit_info is not None else None
        return ServingError(402, "insufficient_balance",
                            f"this request may cost up to {format_far(required)} FAR ({max_tokens} tokens); the "
                            f"account has {format_far(available)} FAR available: deposit at least {format_far(short)} "
                            f"FAR, or lower max_tokens"
                            + ("" if how else " (ask the operator for credit: deposits are not configured here)"),
                            required_far=format_far(required), available_far=format_far(available),
                            shortfall_far=format_far(short), deposit=how)

    @staticmethod
    def replay_of(previous: FinalSession) -> Replay:
        """The stored outcome of a request_id used before: a finished result is replayed; a running, failed or
        interrupted one is reported as such (never as a success, never run twice)."""
        if previous.status in (SessionStatus.COMPLETED, SessionStatus.CANCELLED):
            return Replay(previous)
        if previous.status == SessionStatus.RUNNING:
            raise ServingError(409, "request_in_progress", f"request {previous.request_id!r} is running")
        raise ServingError(409, "request_failed",
                           f"request {previous.request_id!r} ended {previous.status} after "
                           f"{previous.completion_tokens} tokens (billed {format_far(previous.cost_far)} FAR); "
                           f"send a new request_id to try again", session_status=previous.status,
                           tokens_generated=previous.completion_tokens, cost_far=format_far(previous.cost_far))

    async def start(self, request: GenerateRequest, principal: Principal, tools: Optional[ToolSpec] = None
                    ) -> AsyncIterator[StreamEvent]:
        """Admission in order (rate limit, input, idempotent replay, readiness, balance) → the event stream.
        ``tools``: chat completions' tools (rendered into the prompt; their calls may constrain the output)."""
        await self.admit(principal)
        if request.request_id and (principal.account_id, request.request_id) not in self.active:
            # a request_id this account used before: its stored outcome, without the readiness gate and charge
            previous = await self.store.read_by_request_id(request.request_id, principal.account_id)
            if previous is not None:
                return self.replay_events(self.replay_of(previous))
        prepared = await self.prepare(request, tools, principal.account_id)
        if tools is not None and tools.calls_allowed:
            await self.gate(prepared.model)  # calls are read from the swarm's answer: never sent to a fallback API
            fallback = None
        else:  # log-probabilities and several choices only the swarm gives
            fallback = await self.route(prepared.model,
                                        swarm_only=prepared.params.logprobs is not None or prepared.choices > 1)
        release = await self.take_slot(prepared.model.model_id)
        try:
            started = await self.begin(prepared, request, principal, fallback)
        except BaseException:
            release()
            raise
        if isinstance(started, Replay):
            release()
            return self.replay_events(started)
        started.release_slot = release
        if fallback is not None:
            return await self.start_fallback(prepared, request, started, fallback)
        return self.run(prepared, started)

    async def take_slot(self, model_id: str):
        """A running slot of the model, waiting in its bounded queue; 503 ``overloaded`` beyond it."""
        gate = self.admission.get(model_id)
        if gate is None:
            return lambda: None
        try:
            return await gate.acquire()
        except Overloaded as error:
            metrics.REQUESTS.labels(model_id, "overloaded").inc()
            raise ServingError(503, "overloaded", str(error), headers={"Retry-After": str(error.retry_after_s)},
                               retry_after_s=error.retry_after_s, running=gate.running, waiting=gate.waiting)

    # --------------------------------------------------------------------------------------- generation
    async def run(self, prepared: PreparedRequest, active: ActiveGeneration) -> AsyncIterator[StreamEvent]:
        """Token events then the final event. Cancelling the consumer cancels the generation."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        meter = WorkMeter()
        # the account may continue its own parked session (prefix reuse), never another account's
        generation = self.start_generation(prepared, meter, active.cancel, reuse_key=active.account_id)
        active.generation = generation
        generation.session_id = active.session_id  # spot checks dispute contributions of this session
        model_id = active.model_id
        metrics.RUNNING.labels(model_id).inc()
        metrics.PROMPT_TOKENS.labels(model_id).inc(active.prompt_tokens)

        def worker() -> None:
            try:
                for delta in generation:
                    loop.call_soon_threadsafe(queue.put_nowait, delta)
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)
            except BaseException as error:  # noqa: BLE001 - handed to the event loop
                loop.call_soon_threadsafe(queue.put_nowait, error)

        future = loop.run_in_executor(self.executor, worker)
        status, failure, error_code = SessionStatus.COMPLETED, None, None
        deadline = active.started_at + self.generation_timeout_s
        last_checkpoint = (0, time.monotonic())
        last_token_at = None
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    active.cancel.set()
                    status, error_code = SessionStatus.FAILED, "generation_timeout"
                    failure = TimeoutError(f"generation exceeded {self.generation_timeout_s:.0f} s")
                    break
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    status, failure = SessionStatus.FAILED, item
                    error_code = "swarm_unavailable" if isinstance(item, SwarmUnavailable) else "swarm_error"
                    break
                now = time.monotonic()
                if last_token_at is None:
                    metrics.TIME_TO_FIRST_TOKEN.labels(model_id).observe(now - active.started_at)
                else:
                    metrics.INTER_TOKEN_LATENCY.labels(model_id).observe(now - last_token_at)
                last_token_at = now
                active.tokens_generated = item.index
                yield self.token_event(prepared, active, item)
                if (item.index - last_checkpoint[0] >= CHECKPOINT_EVERY_TOKENS
                        or now - last_checkpoint[1] >= CHECKPOINT_EVERY_SECONDS):
                    await self.store.checkpoint(active.session_id, item.index, meter.snapshot())
                    last_checkpoint = (item.index, time.monotonic())
        finally:
            if not future.done():  # the consumer went away, or a timeout: stop within one step, then settle
                active.cancel.set()
            # Settle in a task of its own: when the client disconnects, the stream's cancel scope re-raises at
            # every await here, and the session must still be finalized (and the account settled) exactly once.
            settlement = asyncio.ensure_future(self._complete(active, generation, meter, status, failure, future))
            self._settlements.add(settlement)
            settlement.add_done_callback(self._settlements.discard)
            final = await asyncio.shield(settlement)
        if failure is not None:
            # The raw error (Petals/hivemind text: peer ids, addresses, tracebacks) goes to the log only; the
            # client gets a stable code and message.
            log.error("generation failed", request_id=active.request_id, code=error_code, error=repr(failure),
                      exc_info=failure if error_code == "swarm_error" else None)
            tokens = generation.completion_tokens
            if error_code == "generation_timeout":
                message = (f"the generation exceeded the coordinator's limit of {self.generation_timeout_s:.0f} s "
                           f"after {tokens} tokens; the tokens generated are billed")
            elif error_code == "swarm_unavailable":
                message = str(failure)  # "blocks 2:4: no live server"
            else:
                message = (f"the swarm could not complete the generation (its servers failed, after retries) "
                           f"after {tokens} tokens; the tokens generated are billed; retry with a new request_id")
            status_code = {"generation_timeout": 504, "swarm_unavailable": 503}.get(error_code, 502)
            raise ServingError(status_code, error_code, message, tokens_generated=tokens,
                               cost_far=format_far(final.cost_far), replaced_servers=generation.replaced_servers())
        done = self.done_event(final)
        if isinstance(generation, ChoiceGenerations):
            done.choices = [ChoiceResult(**result) for result in generation.choice_results()]
        yield done

    def token_event(self, prepared: PreparedRequest, active: ActiveGeneration, delta) -> TokenEvent:
        """A generated token on the wire: its choice (n > 1), the running count and cost, its logprobs."""
        return TokenEvent(token=delta.text, index=delta.choice if prepared.choices > 1 else None,
                          request_id=active.request_id, tokens_generated=delta.index,
                          cost_far=format_far(self.cost_of(delta.index, active.prompt_tokens)),
                          logprobs=None if delta.logprob is None else self.logprob_entry(prepared.model,
                                                                                          delta.logprob))

    @staticmethod
    def start_generation(prepared: PreparedRequest, meter: WorkMeter, cancel: threading.Event,
                         reuse_key: Optional[str] = None) -> EngineGeneration:
        """The engine's generation, or for n > 1 the n generations of the choices as one (choices.py; they do not
        continue parked sessions: prefix reuse is for one stream per request)."""
        model, prompt_ids, params = prepared.model, prepared.prompt_ids, prepared.params
        if prepared.choices == 1:
            return model.start(prompt_ids, params, meter, cancel, reuse_key=reuse_key)
        return ChoiceGenerations([model.start(prompt_ids, replace(params, seed=choice_seed(params.seed, choice)),
                                              meter, cancel) for choice in range(prepared.choices)], cancel)

    def logprob_entry(self, model: EngineModel, logprob) -> LogprobEntry:
        """A sampled token's ``sampling.TokenLogprob`` as the wire names tokens (text and bytes)."""
        pieces = self._token_pieces.get(model.model_id)
        if pieces is None:
            pieces = self._token_pieces[model.model_id] = TokenPieces(model.tokenizer)

        def named(token_id: int, value: float) -> dict:
            text, raw = pieces.piece(token_id)
            return {"token": text, "logprob": value, "bytes": raw}

        return LogprobEntry(**named(logprob.token_id, logprob.logprob),
                            top_logprobs=[TopLogprob(**named(i, v)) for i, v in logprob.top])

    async def _complete(self, active: ActiveGeneration, generation, meter: WorkMeter, status: str,
                        failure: Optional[BaseException], worker) -> FinalSession:
        """Wait for the generation thread to stop, then checkpoint, finalize once and record metrics."""
        model_id = active.model_id
        try:
            await worker
            if status == SessionStatus.COMPLETED and generation.finish_reason == FinishReason.CANCELLED:
                status = SessionStatus.CANCELLED
            final = await self._save(active, status=status, finish_reason=generation.finish_reason,
                                     prompt_tokens=active.prompt_tokens,
                                     completion_tokens=generation.completion_tokens,
                                     output_text=generation.text.emitted, failure=failure, work=meter.snapshot(),
                                     replaced_servers=generation.replaced_servers(),
                                     cached_prompt_tokens=generation.cached_tokens)
        finally:
            self.active.pop((active.account_id, active.request_id), None)
            if active.release_slot is not None:
                active.release_slot()
            metrics.RUNNING.labels(model_id).dec()
        metrics.GENERATED_TOKENS.labels(model_id).inc(generation.completion_tokens)
        metrics.E2E_LATENCY.labels(model_id).observe(time.monotonic() - active.started_at)
        metrics.REQUESTS.labels(model_id, final.status).inc()
        for work in meter.snapshot():
            metrics.NODE_WORK_UNITS.labels(work.peer_id).inc(work.work_units)
        log.info("session finalized", request_id=active.request_id, status=final.status,
                 completion_tokens=final.completion_tokens, cost_far=format_far(final.cost_far))
        return final

    async def _save(self, active: ActiveGeneration, *, status: str, finish_reason: Optional[str], prompt_tokens: int,
                    completion_tokens: int, output_text: str, failure: Optional[BaseException], work=(),
                    replaced_servers: Optional[list] = None, cached_prompt_tokens: int = 0) -> FinalSession:
        """Last checkpoint and finalize (both idempotent), retried with backoff. If the database stays
        unreachable the session stays 'running' and the stale-session sweep finalizes it later."""
        delay = FINALIZE_BACKOFF_S
        for attempt in range(1, FINALIZE_ATTEMPTS + 1):
            try:
                await self.store.checkpoint(active.session_id, completion_tokens, work)
                return await self.store.finalize(active.session_id, status=status, finish_reason=finish_reason,
                                                 prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                                 output_text=output_text, error=repr(failure) if failure else None,
                                                 replaced_servers=replaced_servers,
                                                 cached_prompt_tokens=cached_prompt_tokens)
            except Exception as error:  # noqa: BLE001 - database or network: retried, then handed to the sweep
                if attempt == FINALIZE_ATTEMPTS:
                    log.error("finalize failed; the stale-session sweep will finalize the session",
                              request_id=active.request_id, session_id=active.session_id, error=repr(error))
                    raise ServingError(
                        503, "settlement_pending",
                        f"the generation ended after {completion_tokens} tokens but its accounting could "
                        f"not be saved; it will be settled automatically (status 'interrupted')",
                        tokens_generated=completion_tokens) from None
                log.warning("finalize failed; retrying", request_id=active.request_id, attempt=attempt,
                            retry_in_s=delay, error=repr(error))
                await asyncio.sleep(delay)
                delay *= 2

    # ----------------------------------------------------------------------------------------- fallback
    async def start_fallback(self, prepared: PreparedRequest, request: GenerateRequest, active: ActiveGeneration,
                             fallback: FallbackClient) -> AsyncIterator[StreamEvent]:
        """Open the upstream request before answering, so an upstream that refuses or cannot be reached is an
        HTTP 502/504 (not charged) even for a streaming client; then the event stream of its answer."""
        try:
            response = await asyncio.wait_for(fallback.open(request), timeout=self.generation_timeout_s)
        except (FallbackFailed, asyncio.TimeoutError) as error:
            failure = error if isinstance(error, FallbackFailed) else FallbackFailed(
                "fallback_timeout", f"the fallback API did not answer within {self.generation_timeout_s:.0f} s")
            await self._settle_fallback(active, status=SessionStatus.FAILED, finish_reason=None, prompt_tokens=0,
                                        completion_tokens=0, text="", failure=failure, outcome=failure.code)
            raise self._fallback_error(failure.status, failure.code, failure.message, 0, Decimal(0)) from None
        except BaseException:
            await asyncio.shield(self._settle_fallback(active, status=SessionStatus.CANCELLED,
                                                       finish_reason=FinishReason.CANCELLED,
                                                       prompt_tokens=0, completion_tokens=0, text="", failure=None,
                                                       outcome="cancelled"))
            raise
        return self._fallback_events(prepared, active, fallback, response)

    async def _fallback_events(self, prepared: PreparedRequest, active: ActiveGeneration, fallback: FallbackClient,
                               response) -> AsyncIterator[StreamEvent]:
        """Token events of the upstream's answer, then the final event (``served_by: fallback``). Settled like a
        swarm session: once, in a task of its own, whatever way the stream ends."""
        chunks = fallback.chunks(response)
        texts: list[str] = []
        delivered, reported, upstream_finish = 0, None, None
        status, failure, code = SessionStatus.COMPLETED, None, None
        deadline = active.started_at + self.generation_timeout_s
        last_checkpoint = (0, time.monotonic())
        metrics.RUNNING.labels(active.model_id).inc()
        try:
            while True:
                try:  # per chunk, so the deadline never fires while the consumer holds a yielded event
                    chunk = await asyncio.wait_for(anext(chunks), timeout=max(0.0, deadline - time.monotonic()))
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    status, code = SessionStatus.FAILED, "generation_timeout"
                    failure = TimeoutError(f"generation exceeded {self.generation_timeout_s:.0f} s")
                    break
                except FallbackFailed as error:
                    status, failure, code = SessionStatus.FAILED, error, error.code
                    break
                if chunk.completion_tokens is not None:
                    reported = chunk.completion_tokens
                upstream_finish = chunk.finish_reason or upstream_finish
                if chunk.text and delivered < prepared.params.max_tokens:
                    delivered += 1
                    texts.append(chunk.text)
                    active.tokens_generated = delivered
                    yield TokenEvent(token=chunk.text, request_id=active.request_id, tokens_generated=delivered,
                                     cost_far=format_far(self.cost_of(delivered, active.prompt_tokens,
                                                                      active.pricing)))
                    now = time.monotonic()
                    if (delivered - last_checkpoint[0] >= CHECKPOINT_EVERY_TOKENS
                            or now - last_checkpoint[1] >= CHECKPOINT_EVERY_SECONDS):
                        await self.store.checkpoint(active.session_id, delivered, [])
                        last_checkpoint = (delivered, now)
                if active.cancel.is_set():  # DELETE /mesh/inference/{request_id}
                    status = SessionStatus.CANCELLED
                    break
        except BaseException:  # the consumer went away (client disconnected): bill what was delivered
            if status == SessionStatus.COMPLETED:
                status = SessionStatus.CANCELLED
            raise
        finally:
            metrics.RUNNING.labels(active.model_id).dec()
            completed = status == SessionStatus.COMPLETED
            prompt_tokens, completion_tokens = billed_tokens(
                completed=completed, reported_completion=reported, delivered=delivered,
                prompt_tokens=active.prompt_tokens, max_tokens=prepared.params.max_tokens)
            cancelled = status == SessionStatus.CANCELLED
            finish = finish_reason_of(upstream_finish) if completed else FinishReason.CANCELLED if cancelled else None
            settlement = asyncio.ensure_future(self._close_then_settle(
                chunks, active, status=status, finish_reason=finish, prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens, text="".join(texts), failure=failure, outcome=code or status))
            self._settlements.add(settlement)
            settlement.add_done_callback(self._settlements.discard)
            final = await asyncio.shield(settlement)
        if failure is not None:
            log.error("fallback generation failed", request_id=active.request_id, code=code, error=str(failure))
            if code == "generation_timeout":
                message = (f"the generation exceeded the coordinator's limit of {self.generation_timeout_s:.0f} s "
                           f"after {delivered} tokens; the tokens delivered are billed")
            else:
                message = f"{failure.message}; after {delivered} tokens" + (
                    ", which are billed" if delivered else " (nothing billed)")
            raise self._fallback_error(504 if code == "generation_timeout" else failure.status, code, message,
                                       delivered, final.cost_far)
        yield self.done_event(final)

    @staticmethod
    def _fallback_error(status: int, code: str, message: str, tokens: int, cost: Decimal) -> ServingError:
        return ServingError(status, code, message, tokens_generated=tokens, cost_far=format_far(cost),
                            served_by=ServedBy.FALLBACK)

    async def _close_then_settle(self, chunks, active: ActiveGeneration, **settle) -> FinalSession:
        try:
            await chunks.aclose()  # closes the upstream response (a cancelled answer stops being generated)
        except Exception as error:  # noqa: BLE001 - the settlement must happen anyway
            log.warning("closing the fallback stream failed", request_id=active.request_id, error=repr(error))
        return await self._settle_fallback(active, **settle)

    async def _settle_fallback(self, active: ActiveGeneration, *, status: str, finish_reason: Optional[str],
                               prompt_tokens: int, completion_tokens: int, text: str,
                               failure: Optional[BaseException], outcome: str) -> FinalSession:
        try:
            final = await self._save(active, status=status, finish_reason=finish_reason, prompt_tokens=prompt_tokens,
                                     completion_tokens=completion_tokens, output_text=text, failure=failure)
        finally:
            self.active.pop((active.account_id, active.request_id), None)
            if active.release_slot is not None:
                active.release_slot()
        metrics.FALLBACK_REQUESTS.labels(active.model_id, outcome).inc()
        metrics.E2E_LATENCY.labels(active.model_id).observe(time.monotonic() - active.started_at)
        log.info("fallback session finalized", request_id=active.request_id, status=final.status,
                 completion_tokens=final.completion_tokens, cost_far=format_far(final.cost_far))
        return final

    async def sweep_stale_sessions(self, *, interval_s: float, stale_after_s: float) -> None:
        """Background task of the coordinator: every ``interval_s``, finalize stale sessions of any coordinator
        (SessionStore.sweep_stale); errors are logged and the loop goes on."""
        while True:
            try:
                swept = await self.store.sweep_stale(stale_after_s)
                if swept:
                    log.warning("finalized stale sessions as interrupted", count=swept, stale_after_s=stale_after_s)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001
                log.warning("stale-session sweep failed", error=repr(error))
            await asyncio.sleep(interval_s)

    @staticmethod
    def done_event(final: FinalSession) -> DoneEvent:
        return DoneEvent(
            request_id=final.request_id, finish_reason=final.finish_reason or FinishReason.CANCELLED, text=final.output_text or "",
            usage=Usage(prompt_tokens=final.prompt_tokens, completion_tokens=final.completion_tokens,
                        prompt_tokens_details=PromptTokensDetails(cached_tokens=final.cached_prompt_tokens)),
            cost_far=format_far(final.cost_far), fee_far=format_far(final.fee_far),
            contributions=[Contribution(node_id=c.node_id, peer_id=c.peer_id, wallet_address=c.wallet_address,
                                        blocks=c.blocks, work_units=c.work_units,
                                        payment_far=format_far(c.payment_far)) for c in final.contributions],
            replaced_servers=[ReplacedServer(**r) for r in final.replaced_servers], served_by=final.served_by,
        )

    async def replay_events(self, replay: Replay) -> AsyncIterator[StreamEvent]:
        yield self.done_event(replay.final)

    def running(self, request_id: str, account_id: Optional[str]) -> Optional[ActiveGeneration]:
        """The running generation of this account with this request_id, if any."""
        return self.active.get((account_id, request_id))

    def cancel(self, request_id: str, account_id: Optional[str]) -> bool:
        active = self.running(request_id, account_id)
        if active is None:
            return False
        active.cancel.set()
        return True

    # ------------------------------------------------------------------------------ what the routes read
    async def owned_session(self, request_id: str, account_id: Optional[str]) -> FinalSession:
        """The stored session of this account's request_id; 404 when there is none (another account's is none)."""
        final = await self.store.read_by_request_id(request_id, account_id)
        if final is None:
            raise ServingError(404, "request_not_found", f"no request {request_id!r} for this account")
        return final

    async def request_status(self, request_id: str, account_id: Optional[str]) -> dict:
        """GET /mesh/inference/{request_id}: the running generation's progress and route, else the stored outcome."""
        active = self.running(request_id, account_id)
        if active is not None:
            generation = active.generation
            route = generation.route() if generation is not None else []
            return {"request_id": request_id, "status": SessionStatus.RUNNING,
                    "tokens_generated": active.tokens_generated,
                    "cost_far": format_far(self.cost_of(active.tokens_generated, active.prompt_tokens,
                                                        active.pricing)),
                    "served_by": active.served_by,
                    "route": route,
                    "expected_ms_per_token": expected_ms_per_token(route),
                    "replaced_servers": generation.replaced_servers() if generation is not None else []}
        final = await self.owned_session(request_id, account_id)
        return {"request_id": request_id, "status": final.status, "tokens_generated": final.completion_tokens,
                "finish_reason": final.finish_reason,
                "cost_far": format_far(final.cost_far) if final.cost_far is not None else None, "route": [],
                "expected_ms_per_token": None,
                "served_by": final.served_by,
                "replaced_servers": final.replaced_servers,
                "refunded_far": format_far(final.refunded_far) if final.refunded_far is not None else None}

    async def model_infos(self) -> list[ModelInfo]:
        infos = []
        for model_id, model in self.models.items():
            readiness = self.readiness.get(model_id)
            coverage = await readiness.current() if readiness is not None else None
            infos.append(ModelInfo(model_id, model.context_length, coverage, model_id in self.fallbacks))
        return infos

    @property
    def has_models(self) -> bool:
        return bool(self.models)

    def account_service(self):
        """The self-service account API's logic over this service's stores (api/account_routes.py)."""
        return AccountService(self.accounts, self.limiter, self.deposit_info, max_keys=self.max_api_keys,
                              key_creations_per_day=self.key_creations_per_day)

    async def aclose(self) -> None:
        """Cancel running generations and wait until each is finalized."""
        for active in self.active.values():
            active.cancel.set()
        if self._settlements:
            await asyncio.gather(*self._settlements, return_exceptions=True)
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.tokenizers.shutdown()
        for fallback in self.fallbacks.values():
            await fallback.aclose()

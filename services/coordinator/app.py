"""The coordinator's FastAPI application (factory + lifespan)."""

from __future__ import annotations

import asyncio
import socket
import sys
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional

import asyncpg
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware

from services.common.config import ConfigError, CoordinatorSettings
from services.common.http import BodyLimitMiddleware, install_error_handlers
from services.common.logs import bind_request_id, clear_context, get_logger
from services.coordinator.account_service import DepositInfo
from services.coordinator.accounts import AccountStore, check_jwt_secret
from services.coordinator.api.account_routes import router as account_router
from services.coordinator.api.openai_routes import router as openai_router
from services.coordinator.api.routes import router
from services.coordinator.engine_protocol import Engine, EngineFactory, Quarantinable
from services.coordinator.fallback import FallbackClient
from services.coordinator.ratelimit import RateLimiter
from services.coordinator.readiness import SwarmReadiness
from services.coordinator.serving import InferenceService
from services.coordinator.store import Pricing, SessionStore
from services.coordinator.user_page import router as user_page_router

log = get_logger(__name__)


def install_coordinator_handlers(app: FastAPI) -> None:
    """The shared error handlers, and ``request_id`` bound to every log line of a request."""
    install_error_handlers(app, log)

    @app.middleware("http")
    async def _request_context(request: Request, call_next):
        clear_context()
        bind_request_id(request.headers.get("x-request-id") or uuid.uuid4().hex)
        return await call_next(request)


def fallback_clients(settings: CoordinatorSettings, model_ids: list[str]) -> dict[str, FallbackClient]:
    """The FALLBACK_ENDPOINTS of the models served here; one naming another model is a configuration error (a typo
    would silently leave the fallback off)."""
    unknown = sorted(set(settings.FALLBACK_ENDPOINTS) - set(model_ids))
    if unknown:
        print(f"far-mesh: configuration error: FALLBACK_ENDPOINTS names {unknown}, not served by this coordinator "
              f"(it serves {model_ids})", file=sys.stderr)
        raise ConfigError(2)
    for model_id, endpoint in settings.FALLBACK_ENDPOINTS.items():
        log.info("fallback API configured", model_id=model_id, url=endpoint.url, model=endpoint.model or model_id,
                 price_per_token_far=str(endpoint.price_per_token_far))
    return {model_id: FallbackClient(endpoint, model_id) for model_id, endpoint in settings.FALLBACK_ENDPOINTS.items()}


async def swarm_engine(settings: CoordinatorSettings, model_path: Optional[Path]) -> Engine:
    """The production engine: the Petals client of DEFAULT_MODEL_ID on the swarm, gated by its DHT coverage."""
    import torch

    from services.coordinator.engine import SwarmModel
    from services.models.catalog import resolve_model

    # torch's default (one thread per core) made every token ~10 % slower with servers on the same 2 cores: its
    # parallel regions wait for a thread the servers hold (docs/benchmarks.md "The default real model").
    torch.set_num_threads(settings.TORCH_THREADS)
    # a local directory (explicit, or a catalog model built once in the state folder) or a hub name
    path = await asyncio.to_thread(resolve_model, settings.DEFAULT_MODEL_ID,
                                   model_path or settings.FAR_MESH_MODEL_PATH or None)
    log.info("connecting to the swarm", model_id=settings.DEFAULT_MODEL_ID, initial_peers=settings.initial_peers)
    swarm = await asyncio.to_thread(SwarmModel, settings.DEFAULT_MODEL_ID, path, settings.initial_peers,
                                    request_timeout=settings.PETALS_REQUEST_TIMEOUT_S,
                                    max_retries=settings.PETALS_MAX_RETRIES,
                                    step_budget_factor=settings.PETALS_STEP_BUDGET_FACTOR,
                                    step_budget_floor_s=settings.PETALS_STEP_BUDGET_FLOOR_S,
                                    lm_head_wait_s=settings.LM_HEAD_MAX_WAIT_S)
    return Engine(swarm, SwarmReadiness(swarm, refresh_s=settings.SWARM_READINESS_REFRESH_S))


def create_app(settings: CoordinatorSettings, *, model_path: Optional[Path] = None,
               coordinator_id: Optional[str] = None,
               port: int = 8100, engine_factory: EngineFactory = swarm_engine) -> FastAPI:
    """The coordinator: its lifespan opens PostgreSQL and Redis, builds the engine with ``engine_factory``
    (default: the Petals swarm; tests pass a scripted one, tests/scripted_engine.py) and the InferenceService."""
    check_jwt_secret(settings.JWT_SECRET)  # a weak secret would let anyone spend any account
    # Stable across restarts of the same coordinator, so a restart finalizes what the previous run left running.
    coordinator_id = coordinator_id or settings.FAR_MESH_COORDINATOR_ID or f"{socket.gethostname()}:{port}"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import redis.asyncio as aioredis

        app.state.pool = await asyncpg.create_pool(settings.POSTGRES_URL, min_size=1, max_size=20)
        app.state.redis = aioredis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
        store = SessionStore(app.state.pool)
        interrupted = await store.interrupt_orphans(coordinator_id)
        if interrupted:
            log.warning("finalized sessions interrupted by a previous run", count=interrupted)
        engine = await engine_factory(settings, model_path)
        model = engine.model
        if engine.readiness is not None:
            engine.readiness.start()
        # Spot checks re-run sampled steps on other servers (docs/verification.md): for an engine with a swarm.
        quarantinable = isinstance(model, Quarantinable)
        checker = await start_spot_checks(settings, model, app.state.pool) if quarantinable else None
        # Quarantines written by other coordinators and lifts (far-mesh nodes unquarantine) reach this one.
        quarantine_sync = None
        if quarantinable:
            from services.coordinator.checks import CheckStore, keep_quarantine_synced

            quarantine_sync = asyncio.create_task(keep_quarantine_synced(
                CheckStore(app.state.pool), model, settings.SPOT_CHECK_QUARANTINE_SYNC_S))
        pricing = Pricing(settings.PRICE_PER_TOKEN_FAR, settings.PRICE_PER_PROMPT_TOKEN_FAR,
                          settings.PLATFORM_FEE_BPS)
        fallbacks = fallback_clients(settings, [model.model_id])
        app.state.service = InferenceService(
            store=store, accounts=AccountStore(app.state.pool), limiter=RateLimiter(app.state.redis),
            models={model.model_id: model},
            readiness={model.model_id: engine.readiness} if engine.readiness is not None else {},
            default_model_id=settings.DEFAULT_MODEL_ID, pricing=pricing, coordinator_id=coordinator_id,
            jwt_secret=settings.JWT_SECRET, generation_timeout_s=settings.GENERATION_TIMEOUT_S,
            deposit_info=DepositInfo.from_settings(settings), max_api_keys=settings.ACCOUNT_MAX_API_KEYS,
            max_running=settings.MAX_RUNNING_GENERATIONS, max_waiting=settings.MAX_QUEUED_GENERATIONS,
            max_queue_wait_s=settings.MAX_QUEUE_WAIT_S, overloaded_retry_after_s=settings.OVERLOADED_RETRY_AFTER_S,
            fallbacks=fallbacks)
        sweeper = asyncio.create_task(app.state.service.sweep_stale_sessions(
            interval_s=settings.SESSION_SWEEP_INTERVAL_S, stale_after_s=settings.stale_session_after_s))
        log.info("coordinator ready", coordinator_id=coordinator_id)
        try:
            yield
        finally:
            sweeper.cancel()
            if quarantine_sync is not None:
                quarantine_sync.cancel()
            if engine.readiness is not None:
                await engine.readiness.stop()
            await app.state.service.aclose()
            if checker is not None:
                await asyncio.to_thread(checker.stop)
            model.shutdown()
            await app.state.redis.aclose()
            await app.state.pool.close()

    return http_app(settings, lifespan=lifespan)


async def start_spot_checks(settings: CoordinatorSettings, swarm: Quarantinable, pool):
    """The model's spot checker (docs/verification.md), with the quarantine and the peers' records loaded from
    the database; None when SPOT_CHECK_RATE is 0 (the quarantine is enforced either way, and kept in sync with
    the database by ``keep_quarantine_synced``)."""
    from services.coordinator import metrics
    from services.coordinator.checks import CheckConsequences, CheckStore, sync_quarantine
    from services.coordinator.verification import LocalSpanVerifier, SamplingPolicy, SpotChecker, SwarmForward

    store = CheckStore(pool)
    await sync_quarantine(store, swarm)
    if settings.SPOT_CHECK_RATE <= 0:
        return None
    policy = SamplingPolicy(settings.SPOT_CHECK_RATE, settings.SPOT_CHECK_NEW_NODE_RATE,
                            settings.SPOT_CHECK_CLEAN_RECORD, passed=await store.passed_counts())

    def on_quarantine(peer_id: str, reason: str) -> None:
        log.error("peer quarantined", peer_id=peer_id, reason=reason)
        swarm.quarantine(peer_id)
        metrics.QUARANTINED.set(len(swarm.quarantined))

    consequences = CheckConsequences(store, asyncio.get_running_loop(),
                                     quarantine_after=settings.SPOT_CHECK_QUARANTINE_AFTER,
                                     on_quarantine=on_quarantine)
    # the trusted verifier recomputes spans from the model files the coordinator itself loaded
    config = getattr(getattr(swarm, "model", None), "config", None)
    trusted = None if config is None else LocalSpanVerifier(
        getattr(swarm, "model_path", ""), config, int(settings.SPOT_CHECK_TRUSTED_VERIFIER_GB * 2**30))
    checker = SpotChecker(swarm.model_id, SwarmForward(swarm.sequence_manager), policy, consequences,
                          max_queue=settings.SPOT_CHECK_QUEUE, timeout_s=settings.PETALS_REQUEST_TIMEOUT_S,
                          trusted=trusted, retry_s=settings.SPOT_CHECK_RETRY_S,
                          trusted_peers=frozenset(p.strip() for p in settings.SPOT_CHECK_TRUSTED_PEERS.split(",")
                                                  if p.strip()))
    checker.quarantined.update(swarm.quarantined)
    checker.registry = await store.registry()
    swarm.spot_checker = checker
    return checker.start()


def http_app(settings: CoordinatorSettings, *, lifespan=None) -> FastAPI:
    """The HTTP side (handlers, middleware, routes); ``app.state.service`` is set by the lifespan (or a test)."""
    app = FastAPI(title="Far Mesh coordinator", version="0.1.0", lifespan=lifespan)
    install_coordinator_handlers(app)
    # Before anything reads a body (inside CORS, so a 413 carries the CORS headers too).
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.MAX_REQUEST_BODY_BYTES)
    if settings.cors_origins:  # browsers (the TypeScript SDK in a web page) call with a Bearer key, no cookies
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["Retry-After"], max_age=600)
    app.include_router(router)
    app.include_router(openai_router)
    app.include_router(account_router)
    app.include_router(user_page_router)  # GET /account: the user page (docs/user-page.md)
    return app

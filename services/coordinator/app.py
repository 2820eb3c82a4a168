"""The coordinator's FastAPI application (factory + lifespan)."""

from __future__ import annotations

import asyncio
import socket
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional

import asyncpg
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware

from services.common.config import Settings
from services.common.http import BodyLimitMiddleware, install_error_handlers
from services.common.logs import bind_request_id, clear_context, get_logger
from services.coordinator.account_service import DepositInfo
from services.coordinator.accounts import AccountStore, check_jwt_secret
from services.coordinator.api.account_routes import router as account_router
from services.coordinator.api.openai_routes import router as openai_router
from services.coordinator.api.routes import router
from services.coordinator.ratelimit import RateLimiter
from services.coordinator.readiness import SwarmReadiness
from services.coordinator.serving import InferenceService
from services.coordinator.store import Pricing, SessionStore

log = get_logger(__name__)


def install_coordinator_handlers(app: FastAPI) -> None:
    """The shared error handlers, and ``request_id`` bound to every log line of a request."""
    install_error_handlers(app, log)

    @app.middleware("http")
    async def _request_context(request: Request, call_next):
        clear_context()
        bind_request_id(request.headers.get("x-request-id") or uuid.uuid4().hex)
        return await call_next(request)


def create_app(settings: Settings, *, model_path: Optional[Path] = None, coordinator_id: Optional[str] = None,
               port: int = 8100) -> FastAPI:
    check_jwt_secret(settings.JWT_SECRET)  # a weak secret would let anyone spend any account
    # Stable across restarts of the same coordinator, so a restart finalizes what the previous run left running.
    coordinator_id = coordinator_id or settings.FAR_MESH_COORDINATOR_ID or f"{socket.gethostname()}:{port}"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import redis.asyncio as aioredis

        from services.coordinator.engine import SwarmModel

        app.state.pool = await asyncpg.create_pool(settings.POSTGRES_URL, min_size=1, max_size=20)
        app.state.redis = aioredis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
        store = SessionStore(app.state.pool)
        interrupted = await store.interrupt_orphans(coordinator_id)
        if interrupted:
            log.warning("finalized sessions interrupted by a previous run", count=interrupted)
        from services.models.catalog import resolve_model

        # a local directory (explicit, or a catalog model built once in the state folder) or a hub name
        path = await asyncio.to_thread(resolve_model, settings.DEFAULT_MODEL_ID,
                                       model_path or settings.FAR_MESH_MODEL_PATH or None)
        log.info("connecting to the swarm", model_id=settings.DEFAULT_MODEL_ID, initial_peers=settings.initial_peers)
        swarm = await asyncio.to_thread(SwarmModel, settings.DEFAULT_MODEL_ID, path, settings.initial_peers,
                                        request_timeout=settings.PETALS_REQUEST_TIMEOUT_S,
                                        max_retries=settings.PETALS_MAX_RETRIES,
                                        step_budget_factor=settings.PETALS_STEP_BUDGET_FACTOR,
                                        step_budget_floor_s=settings.PETALS_STEP_BUDGET_FLOOR_S)
        checker = await start_spot_checks(settings, swarm, app.state.pool)
        readiness = SwarmReadiness(swarm, refresh_s=settings.SWARM_READINESS_REFRESH_S)
        readiness.start()
        pricing = Pricing(settings.PRICE_PER_TOKEN_FAR, settings.PRICE_PER_PROMPT_TOKEN_FAR,
                          settings.PLATFORM_FEE_BPS)
        app.state.service = InferenceService(
            store=store, accounts=AccountStore(app.state.pool), limiter=RateLimiter(app.state.redis),
            models={swarm.model_id: swarm}, readiness={swarm.model_id: readiness},
            default_model_id=settings.DEFAULT_MODEL_ID, pricing=pricing, coordinator_id=coordinator_id,
            jwt_secret=settings.JWT_SECRET, generation_timeout_s=settings.GENERATION_TIMEOUT_S,
            deposit_info=DepositInfo.from_settings(settings), max_api_keys=settings.ACCOUNT_MAX_API_KEYS,
            max_running=settings.MAX_RUNNING_GENERATIONS, max_waiting=settings.MAX_QUEUED_GENERATIONS,
            max_queue_wait_s=settings.MAX_QUEUE_WAIT_S, overloaded_retry_after_s=settings.OVERLOADED_RETRY_AFTER_S)
        sweeper = asyncio.create_task(app.state.service.sweep_stale_sessions(
            interval_s=settings.SESSION_SWEEP_INTERVAL_S, stale_after_s=settings.stale_session_after_s))
        log.info("coordinator ready", coordinator_id=coordinator_id)
        try:
            yield
        finally:
            sweeper.cancel()
            await readiness.stop()
            await app.state.service.aclose()
            if checker is not None:
                await asyncio.to_thread(checker.stop)
            swarm.shutdown()
            await app.state.redis.aclose()
            await app.state.pool.close()

    return http_app(settings, lifespan=lifespan)


async def start_spot_checks(settings: Settings, swarm, pool):
    """The model's spot checker (docs/verification.md), with the quarantine and the peers' records loaded from
    the database; None when SPOT_CHECK_RATE is 0."""
    from services.coordinator import metrics
    from services.coordinator.checks import CheckConsequences, CheckStore
    from services.coordinator.verification import SamplingPolicy, SpotChecker, SwarmForward

    store = CheckStore(pool)
    for peer_id in await store.quarantined():
        await asyncio.to_thread(swarm.quarantine, peer_id)
    metrics.QUARANTINED.set(len(swarm.quarantined))
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
    checker = SpotChecker(swarm.model_id, SwarmForward(swarm.sequence_manager), policy, consequences,
                          max_queue=settings.SPOT_CHECK_QUEUE, timeout_s=settings.PETALS_REQUEST_TIMEOUT_S)
    checker.quarantined.update(swarm.quarantined)
    swarm.spot_checker = checker
    return checker.start()


def http_app(settings: Settings, *, lifespan=None) -> FastAPI:
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
    return app

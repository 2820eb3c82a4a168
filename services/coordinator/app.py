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
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.config import Settings
from services.common.logs import bind_request_id, clear_context, get_logger
from services.coordinator.api.routes import router
from services.coordinator.serving import InferenceService, ServingError
from services.coordinator.store import Pricing, SessionStore

log = get_logger(__name__)


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
    return "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def _serving(_: Request, error: ServingError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError):
        return JSONResponse({"error": {"code": "invalid_request", "message": _validation_message(error)}},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException):
        return JSONResponse({"error": {"code": f"http_{error.status_code}", "message": str(error.detail)}},
                            status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.middleware("http")
    async def _request_context(request: Request, call_next):
        clear_context()
        bind_request_id(request.headers.get("x-request-id") or uuid.uuid4().hex)
        return await call_next(request)


def create_app(settings: Settings, *, model_path: Optional[Path] = None, coordinator_id: Optional[str] = None,
               port: int = 8100) -> FastAPI:
    coordinator_id = coordinator_id or f"{socket.gethostname()}:{port}"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from services.coordinator.engine import SwarmModel

        app.state.pool = await asyncpg.create_pool(settings.POSTGRES_URL, min_size=1, max_size=10)
        store = SessionStore(app.state.pool)
        interrupted = await store.interrupt_orphans(coordinator_id)
        if interrupted:
            log.warning("finalized sessions interrupted by a previous crash", count=interrupted)
        path = model_path or settings.FAR_MESH_MODEL_PATH
        if not path:
            raise SystemExit("far-mesh coordinator: FAR_MESH_MODEL_PATH (or --model) names no model directory")
        log.info("connecting to the swarm", model_id=settings.DEFAULT_MODEL_ID, initial_peers=settings.initial_peers)
        swarm = await asyncio.to_thread(SwarmModel, settings.DEFAULT_MODEL_ID, path, settings.initial_peers,
                                        request_timeout=settings.PETALS_REQUEST_TIMEOUT_S)
        pricing = Pricing(settings.PRICE_PER_TOKEN_FAR, settings.PRICE_PER_PROMPT_TOKEN_FAR,
                          settings.PLATFORM_FEE_BPS)
        app.state.service = InferenceService(store=store, models={swarm.model_id: swarm},
                                             default_model_id=settings.DEFAULT_MODEL_ID, pricing=pricing,
                                             coordinator_id=coordinator_id)
        log.info("coordinator ready", coordinator_id=coordinator_id)
        try:
            yield
        finally:
            app.state.service.shutdown()
            swarm.shutdown()
            await app.state.pool.close()

    app = FastAPI(title="Far Mesh coordinator", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(router)
    return app

"""The discovery service's FastAPI application: error handling, request context, lifespan.

Logic lives in services/discovery/service.py (``Discovery``), routes in services/discovery/api/routes.py, the
provider dashboard in services/discovery/dashboard.py. See docs/discovery.md.
"""

from __future__ import annotations

import gc
import json
import uuid
from contextlib import asynccontextmanager
from typing import Optional

import asyncpg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from redis.exceptions import RedisError

from services.common.config import DiscoverySettings
from services.common.http import BodyLimitMiddleware, install_error_handlers, validation_message
from services.common.logs import bind_request_id, clear_context, get_logger
from services.discovery.api.routes import router
from services.discovery.dashboard import router as dashboard_router
from services.discovery.hot import HotStore
from services.discovery.models import known_models
from services.discovery.protocol import ApiError, HeartbeatRequest
from services.discovery.service import Discovery

log = get_logger(__name__)

MAX_BODY_BYTES = 64 * 1024


DEPENDENCY_ERRORS = (RedisError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                     asyncpg.CannotConnectNowError, ConnectionError, TimeoutError)


def _dependency_body(error: Exception) -> dict:
    return {"error": {"code": "unavailable",
                      "message": f"a dependency of discovery is unavailable ({type(error).__name__}); retry later"}}


async def _dependency_error(_: Request, error: Exception):
    log.warning("dependency error", error=repr(error))
    return JSONResponse(_dependency_body(error), status_code=503, headers={"Retry-After": "5"})


def install_discovery_error_handlers(app: FastAPI) -> None:
    install_error_handlers(app, log)
    for kind in DEPENDENCY_ERRORS:  # Postgres/Redis down: 503 with Retry-After, not 500
        app.add_exception_handler(kind, _dependency_error)


class RequestContextMiddleware:
    """Pure ASGI (cheaper than BaseHTTPMiddleware on the heartbeat path): binds ``request_id`` for the logs and
    answers POST /nodes/heartbeat without FastAPI's routing. Bodies are capped outside it (BodyLimitMiddleware)."""

    def __init__(self, app, fast_heartbeat: bool = True):
        self.app, self.fast_heartbeat = app, fast_heartbeat

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")[:128]
        clear_context()
        bind_request_id(request_id or uuid.uuid4().hex)
        if scope["path"] == "/nodes/heartbeat" and scope["method"] == "POST" and self.fast_heartbeat:
            service = getattr(scope["app"].state, "discovery", None) if "app" in scope else None
            if service is not None:
                return await self._heartbeat(service, scope, receive, send)
        await self.app(scope, receive, send)

    async def _heartbeat(self, service, scope, receive, send):
        """POST /nodes/heartbeat without FastAPI routing/dependency resolution (the hot path)."""
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
        status, headers = 200, None
        try:
            # no body, or JSON null: a heartbeat without a report (the schema's body is optional and nullable)
            body = HeartbeatRequest.model_validate_json(raw) if raw.strip() not in (b"", b"null") else None
            content = await service.heartbeat(authorization, body)
        except ValidationError as error:
            status, content = 422, {"error": {"code": "invalid_request",
                                              "message": validation_message(error)}}
        except ApiError as error:
            status, content, headers = error.status, error.body(), error.headers
        except DEPENDENCY_ERRORS as error:
            log.warning("dependency error", error=repr(error))
            status, content, headers = 503, _dependency_body(error), {"Retry-After": "5"}
        payload = json.dumps(content, separators=(",", ":")).encode()
        response_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        for key, value in (headers or {}).items():
            response_headers.append((key.lower().encode(), value.encode()))
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": payload})



def create_app(settings: DiscoverySettings, *, models: Optional[dict[str, int]] = None) -> FastAPI:
    models = dict(models) if models is not None else known_models(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pool = await asyncpg.create_pool(settings.POSTGRES_URL, min_size=1, max_size=10)
        hot = HotStore.from_url(settings.REDIS_URL, heartbeat_ttl_s=settings.NODE_HEARTBEAT_TTL_S)
        service = Discovery(settings, pool, hot, models)
        app.state.discovery = service
        service.start()
        # Everything loaded so far lives as long as the process: keep it out of the cyclic GC's full
        # collections, whose pauses otherwise show up as heartbeat tail latency.
        gc.collect()
        gc.freeze()
        log.info("discovery ready", models=models, dht=settings.initial_peers, ttl_s=service.ttl)
        try:
            yield
        finally:
            await service.stop()
            await hot.close()
            await pool.close()

    app = FastAPI(title="Far Mesh discovery", version="0.1.0", lifespan=lifespan)
    install_discovery_error_handlers(app)
    app.add_middleware(RequestContextMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES)  # added last: runs first
    app.include_router(router)
    app.include_router(dashboard_router)
    return app

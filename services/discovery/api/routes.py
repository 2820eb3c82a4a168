"""HTTP routes of the discovery API: thin wrappers over services.discovery.service.Discovery."""

from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.common.http import readiness_response
from services.discovery.protocol import HeartbeatRequest, RegisterRequest
from services.discovery.service import Discovery

router = APIRouter()


def get_discovery(request: Request) -> Discovery:
    return request.app.state.discovery


# --- nodes ---------------------------------------------------------------------------------------------------
@router.get("/nodes/challenge")
async def challenge(request: Request, peer_id: str = Query(..., max_length=128),
                    service: Discovery = Depends(get_discovery)):
    return await service.challenge(peer_id, client=request.client.host if request.client else "unknown")


@router.post("/nodes/register")
async def register(body: RegisterRequest, service: Discovery = Depends(get_discovery)):
    return await service.register(body)


@router.post("/nodes/heartbeat")
async def heartbeat(body: Optional[HeartbeatRequest] = None, authorization: Optional[str] = Header(default=None),
                    service: Discovery = Depends(get_discovery)):
    """Served by the app's RequestContextMiddleware fast path (same logic, without FastAPI's per-request
    overhead); this route documents it in the OpenAPI schema and serves it if the fast path is off."""
    return JSONResponse(await service.heartbeat(authorization, body))


@router.post("/nodes/unregister")
async def unregister(authorization: Optional[str] = Header(default=None), service: Discovery = Depends(get_discovery)):
    return await service.unregister(authorization)


@router.get("/nodes/active")
async def active(model_id: Optional[str] = Query(default=None, max_length=200),
                 service: Discovery = Depends(get_discovery)):
    return await service.active_nodes(model_id)


@router.get("/nodes/by-peer/{peer_id}")
async def node_by_peer(peer_id: str, service: Discovery = Depends(get_discovery)):
    return await service.node_by_peer(peer_id)


@router.get("/nodes/{node_id}")
async def node(node_id: str, service: Discovery = Depends(get_discovery)):
    return await service.node_by_id(node_id)


# --- models --------------------------------------------------------------------------------------------------
@router.get("/models")
async def list_models(service: Discovery = Depends(get_discovery)):
    return service.list_models()


@router.get("/models/{model_id:path}/coverage")
async def coverage(model_id: str, service: Discovery = Depends(get_discovery)):
    return await service.coverage(model_id)


@router.get("/models/{model_id:path}/nodes")
async def model_nodes(model_id: str, service: Discovery = Depends(get_discovery)):
    return await service.model_nodes(model_id)


# --- providers -----------------------------------------------------------------------------------------------
@router.get("/provider/{wallet}/stats")
async def provider_stats(wallet: str, service: Discovery = Depends(get_discovery)):
    return await service.provider_stats(wallet)


@router.get("/provider/{wallet}/earnings")
async def provider_earnings(wallet: str, service: Discovery = Depends(get_discovery)):
    return await service.provider_earnings(wallet)


@router.get("/provider/{wallet}/payments")
async def provider_payments(wallet: str, service: Discovery = Depends(get_discovery)):
    return await service.provider_payments(wallet)


@router.get("/provider/{wallet}/nodes")
async def provider_nodes(wallet: str, service: Discovery = Depends(get_discovery)):
    return await service.provider_nodes(wallet)


@router.get("/provider/{wallet}/checks")
async def provider_checks(wallet: str, service: Discovery = Depends(get_discovery)):
    return await service.provider_checks(wallet)


# --- operations ----------------------------------------------------------------------------------------------
@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(service: Discovery = Depends(get_discovery)):
    return readiness_response(await service.readiness_problems(), dht=service.watcher.enabled)


@router.get("/metrics")
async def metrics(service: Discovery = Depends(get_discovery)):
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

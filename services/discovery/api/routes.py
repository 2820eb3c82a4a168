"""HTTP routes of the discovery API: thin wrappers over services.discovery.service.Discovery."""

from __future__ import annotations

import uuid
from typing import Optional

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.common.http import (HEALTH_RESPONSES, METRICS_RESPONSES, READY_RESPONSES, error_responses,
                                  readiness_response)
from services.common.wallets import WALLET_SCHEMA
from services.discovery.protocol import (PEER_ID_SCHEMA, ActiveNodes, Challenge, HeartbeatAnswer,
                                         HeartbeatRequest, ModelList, ModelNodes, ProviderNodes, ProviderStats,
                                         Registered, RegisterRequest, Unregistered)
from services.discovery.service import Discovery

router = APIRouter()

NODE_TOKEN = error_responses(401, 503, e401="no, unknown or revoked node token (register again)")
UNKNOWN_MODEL = error_responses(404, 503, e404="the model is not served by this mesh")
WALLET = {**error_responses(422, 503, e422="the wallet is not a payable address (wrong format, zero address, "
                                          "or a mixed-case address failing its EIP-55 checksum)")}
Wallet = Path(json_schema_extra=WALLET_SCHEMA)


def get_discovery(request: Request) -> Discovery:
    return request.app.state.discovery


# --- nodes ---------------------------------------------------------------------------------------------------
@router.get("/nodes/challenge", response_model=Challenge,
            responses=error_responses(422, 429, 503, e429="too many challenges from this address (Retry-After)"))
async def challenge(request: Request, peer_id: str = Query(json_schema_extra=PEER_ID_SCHEMA),
                    service: Discovery = Depends(get_discovery)):
    client = service.proxies.client(request.client.host if request.client else None,
                                    request.headers.getlist("x-forwarded-for"))
    return await service.challenge(peer_id, client=client)


@router.post("/nodes/register", response_model=Registered,
             responses=error_responses(400, 401, 404, 413, 422, 503, e400="the body is not JSON",
                                       e401="the signature does not prove control of peer_id, or the nonce is "
                                            "unknown, expired, used or issued for another peer",
                                       e404="the model is not served by this mesh"))
async def register(body: RegisterRequest, service: Discovery = Depends(get_discovery)):
    return await service.register(body)


@router.post("/nodes/heartbeat", response_model=HeartbeatAnswer,
             responses={**NODE_TOKEN, **error_responses(400, 413, 422, e400="the body is not JSON")})
async def heartbeat(body: Optional[HeartbeatRequest] = None, authorization: Optional[str] = Header(default=None),
                    service: Discovery = Depends(get_discovery)):
    """Served by the app's RequestContextMiddleware fast path (same logic, without FastAPI's per-request
    overhead); this route documents it in the OpenAPI schema and serves it if the fast path is off."""
    return JSONResponse(await service.heartbeat(authorization, body))


@router.post("/nodes/unregister", response_model=Unregistered, responses=NODE_TOKEN)
async def unregister(authorization: Optional[str] = Header(default=None), service: Discovery = Depends(get_discovery)):
    return await service.unregister(authorization)


@router.get("/nodes/active", response_model=ActiveNodes, responses={**UNKNOWN_MODEL, **error_responses(422)})
async def active(model_id: Optional[str] = Query(default=None, max_length=200),
                 service: Discovery = Depends(get_discovery)):
    return await service.active_nodes(model_id)


@router.get("/nodes/by-peer/{peer_id}", responses=error_responses(404, 422, 503, e404="no node with this peer ID"))
async def node_by_peer(peer_id: str = Path(json_schema_extra=PEER_ID_SCHEMA),
                       service: Discovery = Depends(get_discovery)):
    return await service.node_by_peer(peer_id)


# {node_id:uuid}: only a UUID routes here, so GET /nodes/register is a 405 (Allow: POST), not a bad node ID.
@router.get("/nodes/{node_id:uuid}", responses=error_responses(404, 503, e404="no node with this ID"))
async def node(node_id: uuid.UUID, service: Discovery = Depends(get_discovery)):
    return await service.node_by_id(str(node_id))


# --- models --------------------------------------------------------------------------------------------------
@router.get("/models", response_model=ModelList)
async def list_models(service: Discovery = Depends(get_discovery)):
    return service.list_models()


@router.get("/models/{model_id:path}/coverage", responses=UNKNOWN_MODEL)
async def coverage(model_id: str, service: Discovery = Depends(get_discovery)):
    return await service.coverage(model_id)


@router.get("/models/{model_id:path}/nodes", response_model=ModelNodes, responses=UNKNOWN_MODEL)
async def model_nodes(model_id: str, service: Discovery = Depends(get_discovery)):
    return await service.model_nodes(model_id)


# --- providers -----------------------------------------------------------------------------------------------
@router.get("/provider/{wallet}/stats", response_model=ProviderStats, responses=WALLET)
async def provider_stats(wallet: str = Wallet, service: Discovery = Depends(get_discovery)):
    return await service.provider_stats(wallet)


@router.get("/provider/{wallet}/earnings", responses=WALLET)
async def provider_earnings(wallet: str = Wallet, service: Discovery = Depends(get_discovery)):
    return await service.provider_earnings(wallet)


@router.get("/provider/{wallet}/payments", responses=WALLET)
async def provider_payments(wallet: str = Wallet, service: Discovery = Depends(get_discovery)):
    return await service.provider_payments(wallet)


@router.get("/provider/{wallet}/nodes", response_model=ProviderNodes, responses=WALLET)
async def provider_nodes(wallet: str = Wallet, service: Discovery = Depends(get_discovery)):
    return await service.provider_nodes(wallet)


@router.get("/provider/{wallet}/checks", responses=WALLET)
async def provider_checks(wallet: str = Wallet, service: Discovery = Depends(get_discovery)):
    return await service.provider_checks(wallet)


# --- operations ----------------------------------------------------------------------------------------------
@router.get("/healthz", responses=HEALTH_RESPONSES)
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", responses=READY_RESPONSES)
async def readyz(service: Discovery = Depends(get_discovery)):
    return readiness_response(await service.readiness_problems(), dht=service.watcher.enabled)


@router.get("/metrics", responses=METRICS_RESPONSES)
async def metrics(service: Discovery = Depends(get_discovery)):
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

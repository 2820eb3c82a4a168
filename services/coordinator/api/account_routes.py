"""Self-service account API: thin routes over services.coordinator.account_service (docs/accounts.md)."""

from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Depends, Query, Request

from services.common.http import error_responses, json_body
from services.coordinator.account_protocol import (ApiKey, ApiKeys, Balance, CreateKey, Ledger, NewApiKey, Timestamp,
                                                   Usage)
from services.coordinator.account_service import AccountService
from services.coordinator.accounts import Principal
from services.coordinator.api.deps import get_principal, read_body

router = APIRouter(prefix="/mesh/account", tags=["account"])
ERRORS = error_responses(401, 404, 429, e401="no or invalid credentials (a revoked key is refused at once)",
                         e404="the account no longer exists")
PAGED = {**ERRORS, **error_responses(422)}  # limit/before/days out of bounds


def get_account_service(request: Request) -> AccountService:
    """Built once per inference service (the lifespan or a test sets that one) and cached with it: an app whose
    lifespan runs again gets a new inference service, and must not keep the old one's closed pool."""
    inference = request.app.state.service
    cached = getattr(request.app.state, "account_service", None)
    if cached is None or cached[0] is not inference:
        cached = request.app.state.account_service = (inference, inference.account_service())
    return cached[1]


async def admitted(principal: Principal = Depends(get_principal),
                   service: AccountService = Depends(get_account_service)) -> Principal:
    await service.admit(principal)
    return principal


@router.get("", response_model=Balance, responses=ERRORS, summary="Balance, reserved amount and how to deposit")
async def balance(principal: Principal = Depends(admitted), service: AccountService = Depends(get_account_service)):
    return await service.balance(principal)


@router.get("/ledger", response_model=Ledger, responses=PAGED,
            summary="Statement: deposits, grants and charges (with the refunded part of each reservation)")
async def ledger(limit: int = Query(50, ge=1, le=500), before: Optional[Timestamp] = Query(None),
                 principal: Principal = Depends(admitted), service: AccountService = Depends(get_account_service)):
    return await service.ledger(principal, limit=limit, before=before)


@router.get("/usage", response_model=Usage, responses=PAGED,
            summary="Usage per request (tokens, cost, nodes that served it), per day, and totals")
async def usage(limit: int = Query(50, ge=1, le=500), before: Optional[Timestamp] = Query(None),
                days: int = Query(30, ge=1, le=366), principal: Principal = Depends(admitted),
                service: AccountService = Depends(get_account_service)):
    return await service.usage(principal, limit=limit, before=before, days=days)


@router.get("/keys", response_model=ApiKeys, responses=ERRORS, summary="The account's API keys (never the secrets)")
async def list_keys(principal: Principal = Depends(admitted), service: AccountService = Depends(get_account_service)):
    return await service.list_keys(principal)


@router.post("/keys", response_model=NewApiKey, status_code=201, summary="Create an API key (the secret is shown once)",
             responses={**ERRORS, **error_responses(409, 413, 422, e409="too many active keys")},
             openapi_extra=json_body(CreateKey))
async def create_key(request: Request, principal: Principal = Depends(admitted),
                     service: AccountService = Depends(get_account_service)):
    body = await read_body(request, CreateKey)  # after authentication
    return await service.create_key(principal, name=body.name, rate_limit_per_minute=body.rate_limit_per_minute)


@router.delete("/keys/{key_id}", response_model=ApiKey, summary="Revoke a key: refused at once by every coordinator",
               responses={**ERRORS, **error_responses(404, e404="no such key on this account")})
async def revoke_key(key_id: str, principal: Principal = Depends(admitted),
                     service: AccountService = Depends(get_account_service)):
    return await service.revoke_key(principal, key_id)

"""HTTP routes of the coordinator's own API: thin wrappers over services.coordinator.serving."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette.sse import EventSourceResponse

from services.common.http import (HEALTH_RESPONSES, METRICS_RESPONSES, READY_RESPONSES, error_responses, json_body,
                                  readiness_response)
from services.coordinator.accounts import Principal
from services.coordinator.api.deps import get_principal, get_service, read_body
from services.coordinator.protocol import (GENERATE_RESPONSES, CancelResult, DoneEvent, GenerateRequest,
                                           InferenceStatus, TokenEvent)
from services.coordinator.serving import InferenceService, ServingError

router = APIRouter()


async def _sse(events):
    try:
        async for event in events:
            # a token event without logprobs has no logprobs key (the request did not ask for them)
            yield {"data": json.dumps(event.model_dump(exclude_none=isinstance(event, TokenEvent)))}
    except ServingError as error:  # the stream already began: report in-band
        yield {"event": "error", "data": json.dumps(error.body())}


@router.post("/mesh/inference/generate", responses=GENERATE_RESPONSES, openapi_extra=json_body(GenerateRequest))
async def generate(request: Request, service: InferenceService = Depends(get_service),
                   principal: Principal = Depends(get_principal)):
    body = await read_body(request, GenerateRequest)  # after authentication
    events = await service.start(body, principal)
    if body.stream:
        return EventSourceResponse(_sse(events), ping=15)
    final, entries = None, []
    async for event in events:
        if isinstance(event, DoneEvent):
            final = event
        elif event.logprobs is not None:
            entries.append(event.logprobs.model_dump())
    answer = final.model_dump()
    if body.logprobs is not None:  # one entry per generated token that was sent as text
        answer["logprobs"] = entries
    return JSONResponse(answer)


@router.get("/mesh/inference/{request_id:request_id}", response_model=InferenceStatus,
            responses=error_responses(401, 404, e404="no request with this id for this account"))
async def inference_status(request_id: str, service: InferenceService = Depends(get_service),
                           principal: Principal = Depends(get_principal)):
    return await service.request_status(request_id, principal.account_id)


@router.delete("/mesh/inference/{request_id:request_id}", response_model=CancelResult,
               responses=error_responses(401, 404, e404="no request with this id for this account"))
async def cancel_inference(request_id: str, service: InferenceService = Depends(get_service),
                           principal: Principal = Depends(get_principal)):
    if service.cancel(request_id, principal.account_id):
        return {"request_id": request_id, "status": "cancelling"}
    final = await service.owned_session(request_id, principal.account_id)
    return {"request_id": request_id, "status": final.status}


@router.get("/healthz", responses=HEALTH_RESPONSES)
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", responses=READY_RESPONSES)
async def readyz(request: Request):
    state = request.app.state
    problems = []
    try:
        await state.pool.fetchval("SELECT 1")
    except Exception as error:  # noqa: BLE001
        problems.append(f"postgres: {error}")
    if getattr(state, "redis", None) is not None:
        try:
            await state.redis.ping()
        except Exception as error:  # noqa: BLE001
            problems.append(f"redis: {error}")
    if not getattr(state, "service", None) or not state.service.has_models:
        problems.append("no model loaded")
    return readiness_response(problems)


@router.get("/metrics", responses=METRICS_RESPONSES)
async def metrics():
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

"""HTTP routes of the coordinator: thin wrappers over services.coordinator.serving."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette.sse import EventSourceResponse

from services.coordinator.api.deps import get_service
from services.coordinator.protocol import GenerateRequest
from services.coordinator.serving import InferenceService, ServingError

router = APIRouter()


async def _sse(events, request_id: str):
    try:
        async for event in events:
            yield {"data": json.dumps(event)}
    except ServingError as error:  # the stream already began: report in-band
        yield {"event": "error", "data": json.dumps(error.body())}


@router.post("/mesh/inference/generate")
async def generate(body: GenerateRequest, service: InferenceService = Depends(get_service)):
    prepared = service.prepare(body)
    active = await service.open_session(prepared, body)
    events = service.run(prepared, active)
    if body.stream:
        return EventSourceResponse(_sse(events, active.request_id), ping=15)
    final = None
    async for event in events:
        if event.get("done"):
            final = event
    return JSONResponse(final)


@router.get("/mesh/inference/{request_id}")
async def inference_status(request_id: str, service: InferenceService = Depends(get_service)):
    active = service.active.get(request_id)
    if active is not None:
        return {"request_id": request_id, "status": "running", "tokens_generated": active.tokens_generated,
                "route": active.generation.route() if active.generation is not None else []}
    row = await service.store.find_by_request_id(request_id)
    if row is None:
        raise ServingError(404, "request_not_found", f"no request {request_id!r}")
    return {"request_id": request_id, "status": row["status"], "tokens_generated": row["completion_tokens"],
            "finish_reason": row["finish_reason"], "route": []}


@router.delete("/mesh/inference/{request_id}")
async def cancel_inference(request_id: str, service: InferenceService = Depends(get_service)):
    if service.cancel(request_id):
        return {"request_id": request_id, "status": "cancelling"}
    if await service.store.find_by_request_id(request_id) is None:
        raise ServingError(404, "request_not_found", f"no request {request_id!r}")
    return {"request_id": request_id, "status": "finished"}


@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    state = request.app.state
    problems = []
    try:
        await state.pool.fetchval("SELECT 1")
    except Exception as error:  # noqa: BLE001
        problems.append(f"postgres: {error}")
    if not getattr(state, "service", None) or not state.service.models:
        problems.append("no model loaded")
    if problems:
        return JSONResponse({"status": "not_ready", "problems": problems}, status_code=503)
    return {"status": "ready"}


@router.get("/metrics")
async def metrics():
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

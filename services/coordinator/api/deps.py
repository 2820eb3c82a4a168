"""FastAPI dependencies of the coordinator."""

from __future__ import annotations

from typing import Optional

from fastapi import Header, Request

from services.coordinator.accounts import Principal
from services.coordinator.serving import InferenceService


def get_service(request: Request) -> InferenceService:
    return request.app.state.service


async def get_principal(request: Request, authorization: Optional[str] = Header(None)) -> Principal:
    return await request.app.state.service.authenticate(authorization)

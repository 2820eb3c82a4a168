"""FastAPI dependencies of the coordinator."""

from __future__ import annotations

from fastapi import Request

from services.coordinator.serving import InferenceService


def get_service(request: Request) -> InferenceService:
    return request.app.state.service

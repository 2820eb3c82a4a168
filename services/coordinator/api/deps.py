"""FastAPI dependencies of the coordinator."""

from __future__ import annotations

from typing import Optional, TypeVar

from fastapi import Header, Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from services.common.http import validation_message

from services.coordinator.accounts import Principal
from services.coordinator.serving import InferenceService, ServingError

Body = TypeVar("Body", bound=BaseModel)


def get_service(request: Request) -> InferenceService:
    return request.app.state.service


async def get_principal(request: Request, authorization: Optional[str] = Header(None)) -> Principal:
    return await request.app.state.service.authenticate(authorization)


async def read_body(request: Request, model: type[Body]) -> Body:
    """The JSON body as ``model``. Routes read it themselves, after their dependencies (credentials) passed:
    FastAPI would read and parse a declared body before authenticating (a large unauthenticated body would be
    parsed first). The body's size is capped before this by BodyLimitMiddleware."""
    try:
        raw = await request.body()
    except ClientDisconnect:  # the client went away, or BodyLimitMiddleware answered 413 already
        raise ServingError(400, "client_disconnected", "the request body was not received completely") from None
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        raise ServingError(422, "invalid_request", validation_message(error)) from None

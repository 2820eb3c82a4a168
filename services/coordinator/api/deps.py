"""FastAPI dependencies of the coordinator."""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

from fastapi import Header, Request
from pydantic import BaseModel, ValidationError
from starlette.convertors import StringConvertor, register_url_convertor
from starlette.requests import ClientDisconnect

from services.common.http import validation_message

from services.coordinator.accounts import Principal
from services.coordinator.protocol import RESERVED_REQUEST_IDS, UNSUPPORTED
from services.coordinator.serving import InferenceService, ServingError

Body = TypeVar("Body", bound=BaseModel)


class RequestIdConvertor(StringConvertor):
    """``{request_id:request_id}`` in a route path: any path segment but a reserved one, so that GET
    /mesh/inference/generate is a 405 (Allow: POST), not the status of a request named "generate"."""

    regex = "(?!(?:" + "|".join(RESERVED_REQUEST_IDS) + ")$)[^/]+"


register_url_convertor("request_id", RequestIdConvertor())


def get_service(request: Request) -> InferenceService:
    return request.app.state.service


async def get_principal(request: Request, authorization: Optional[str] = Header(None)) -> Principal:
    return await request.app.state.service.authenticate(authorization)


async def read_body(request: Request, model: type[Body], unsupported: Optional[Callable[[str, str, Optional[str]], str]]
                    = None) -> Body:
    """The JSON body as ``model``. Routes read it themselves, after their dependencies (credentials) passed:
    FastAPI would read and parse a declared body before authenticating (a large unauthenticated body would be
    parsed first). The body's size is capped before this by BodyLimitMiddleware. With ``unsupported`` (param path,
    field name, detail → message), a field the model does not declare, or a value it marks unsupported, is a
    400 ``unsupported_parameter`` naming it (OpenAI's answer) instead of a 422."""
    try:
        raw = await request.body()
    except ClientDisconnect:  # the client went away, or BodyLimitMiddleware answered 413 already
        raise ServingError(400, "client_disconnected", "the request body was not received completely") from None
    try:
        # JSON whatever the Content-Type says: curl -d sends application/x-www-form-urlencoded by default
        return model.model_validate_json(raw)
    except ValidationError as error:
        refused = unsupported_parameter(error) if unsupported is not None else None
        if refused is not None:
            param, field, detail = refused
            raise ServingError(400, UNSUPPORTED, unsupported(param, field, detail), type="invalid_request_error",
                               param=param) from None
        raise ServingError(422, "invalid_request", body_problem(error, raw)) from None


def unsupported_parameter(error: ValidationError) -> Optional[tuple[str, str, Optional[str]]]:
    """(path as OpenAI writes it, e.g. ``messages[0].name``; the field's name; the validator's reason or None) of
    the outermost unsupported field or value of ``error``, or None."""
    found = [item for item in error.errors() if item.get("type") in ("extra_forbidden", UNSUPPORTED)]
    if not found:
        return None
    item = min(found, key=lambda entry: len(entry["loc"]))
    # a union's member is named in the location ("list[ContentPart]"): not a field
    loc = [part for part in item["loc"] if isinstance(part, int) or part.isidentifier()]
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    names = [part for part in loc if isinstance(part, str)]
    detail = item["msg"] if item["type"] == UNSUPPORTED else None
    return path, names[-1] if names else path, detail


BODY_HINT = ('send a JSON object, e.g. {"prompt": "Hello", "max_tokens": 64} or {"messages": [{"role": "user", '
             '"content": "Hello"}]} (with curl: -d \'{...}\'; any Content-Type is accepted)')


def body_problem(error: ValidationError, raw: bytes) -> str:
    """The reason of a 422, naming the fix when the body is not a JSON object at all (a form, plain text)."""
    first = error.errors()[0] if error.errors() else {}
    if first.get("type") == "json_invalid" or not raw.strip():
        return f"the request body is not JSON ({first.get('msg', 'empty body')}): {BODY_HINT}"
    if not first.get("loc") and first.get("type") in ("model_type", "dict_type", "model_attributes_type"):
        return f"the request body must be a JSON object: {BODY_HINT}"
    return validation_message(error)

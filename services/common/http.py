"""HTTP pieces shared by the services: the error type, its JSON body ``{"error": {"code", "message", ...}}`` and
the exception handlers every FastAPI app installs (so no request ever gets a bare 500)."""

from __future__ import annotations

import json
from typing import Annotated, Literal, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match


class ApiError(Exception):
    """An error answer: HTTP ``status``, a stable ``code``, a readable ``message`` and extra body fields."""

    def __init__(self, status: int, code: str, message: str, *, headers: Optional[dict] = None, **extra):
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.extra = status, code, message, headers or {}, extra

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


def _integral(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer as JSON Schema means it, for strict request models: 3 and 3.0 (the same JSON number), never "3" or
# true. (pydantic's strict mode refuses 3.0; its lax mode takes "3".)
JsonInt = Annotated[int, BeforeValidator(_integral)]


# The largest integer every JSON parser holds exactly (a double's 53 bits; JavaScript's Number.MAX_SAFE_INTEGER):
# the bound of open-ended integer fields, so a bound check means the same in a schema validator and here.
MAX_SAFE_INTEGER = 2**53 - 1


def json_int(**bounds):
    """JsonInt with bounds (``ge=``, ``le=``), for Optional fields: the bounds must come before the validator in the
    Annotated, or pydantic writes them into the JSON Schema as "ge"/"le" instead of "minimum"/"maximum"."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


class ErrorDetail(BaseModel):
    """``code`` is stable (for programs), ``message`` readable (for people); some errors add fields, e.g.
    ``retry_after_s`` (429, 503), ``max_body_bytes`` (413), ``required_far``/``shortfall_far`` (402)."""

    model_config = ConfigDict(extra="allow")

    code: str = Field(examples=["invalid_request"])
    message: str


class ErrorBody(BaseModel):
    """Every error answer of every service: ``{"error": {"code", "message", ...}}``."""

    error: ErrorDetail


ERROR_DESCRIPTIONS = {
    400: "the input cannot be served (e.g. the prompt does not fit the model's context)",
    401: "no or invalid credentials",
    402: "the account's available balance does not cover the request's maximum cost (how to deposit included)",
    404: "no such resource",
    409: "conflict with the current state (e.g. a request_id in use)",
    413: "the request body is larger than the service accepts (max_body_bytes)",
    422: "the input breaks a rule of the schema (the message names the field and the rule)",
    429: "rate limited: retry after the Retry-After header's seconds",
    502: "an upstream (the swarm's servers, the fallback API) failed",
    503: "not available now (a dependency is down, the swarm is not ready, overloaded): retry later",
    504: "an upstream or the generation took longer than allowed",
}


def error_responses(*statuses: int, **descriptions: str) -> dict:
    """OpenAPI ``responses=`` entries of the error shape for ``statuses``; ``descriptions`` (``e404="..."``)
    replace the generic text of a status."""
    return {status: {"model": ErrorBody,
                     "description": descriptions.get(f"e{status}", ERROR_DESCRIPTIONS[status])}
            for status in statuses}


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    """GET /readyz of every service (readiness_response); services add fields of their own."""

    model_config = ConfigDict(extra="allow")

    status: Literal["ready", "not_ready"]
    problems: list[str]


# One Server-Sent Event as schemathesis and OpenAPI < 3.2 read an event stream's schema (each event; `data` is the
# JSON text of the event's payload).
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"},
                            "retry": {"type": "integer"}}}

HEALTH_RESPONSES = {200: {"model": Health, "description": "the process answers"}}
READY_RESPONSES = {200: {"model": Readiness, "description": "ready: every dependency answers"},
                   503: {"model": Readiness, "description": "not ready: `problems` says why"}}
METRICS_RESPONSES = {200: {"description": "Prometheus text exposition",
                           "content": {"text/plain": {"schema": {"type": "string"}}}}}


def _inline(schema, defs: dict):
    if isinstance(schema, dict):
        ref = schema.get("$ref", "")
        if ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {key: _inline(value, defs) for key, value in schema.items() if key != "$defs"}
    if isinstance(schema, list):
        return [_inline(item, defs) for item in schema]
    return schema


def json_body(model: type[BaseModel]) -> dict:
    """``openapi_extra`` documenting ``model`` as the required JSON body of a route that reads its body itself
    (after authenticating; see services/coordinator/api/deps.py read_body). Nested models are inlined: a
    ``#/$defs/...`` reference would not resolve inside the OpenAPI document."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": _inline(schema, schema.get("$defs", {}))}}}}


def allowed_methods(app, scope) -> list[str]:
    """Every method some route serves at this path (Starlette's 405 names only the first matching route's). Asks
    the app's own routes, one method at a time, so included routers and path converters count as routing does."""
    allowed = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
        probe = {**scope, "method": method}
        if any(route.matches(probe)[0] == Match.FULL for route in app.router.routes):
            allowed.append(method)
    return allowed


# "Not blank": at least one character that is not white space. A pattern (not a Python check) so that the OpenAPI
# schema states the very rule that is enforced; validation_message() words its failure.
NOT_BLANK = r"\S"


def validation_message(error) -> str:
    """One readable line from a pydantic/FastAPI validation error: ``field: reason; field: reason``."""
    parts = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item.get("loc", ()) if p not in ("body", "query", "path", "header"))
        if item.get("type") == "string_pattern_mismatch" and (item.get("ctx") or {}).get("pattern") == NOT_BLANK:
            parts.append(f"{loc or 'the value'} is empty (it needs a character that is not white space)")
            continue
        msg = str(item.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def readiness_response(problems: list[str], **details) -> JSONResponse:
    """Every service's GET /readyz, one shape: 200 ``{"status": "ready", ...}`` or 503 ``{"status": "not_ready",
    "problems": [why, ...], ...}`` (load balancers read the code, people and health checks the reasons)."""
    body = {"status": "not_ready" if problems else "ready", "problems": problems, **details}
    return JSONResponse(body, status_code=503 if problems else 200)


def install_error_handlers(app: FastAPI, log) -> None:
    """ApiError → its status and body; invalid input → 422 with the reasons; HTTP errors (404 of unknown routes,
    405, ...) → the same body shape; anything unexpected → 500 ``internal_error``, logged with its traceback."""

    @app.exception_handler(ApiError)
    async def _api(_: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError):
        return JSONResponse({"error": {"code": "invalid_request", "message": validation_message(error)}},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException):
        headers = dict(getattr(error, "headers", None) or {})
        if error.status_code == 405:  # Allow: the methods of every route at this path, not just the first one's
            headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope))
        return JSONResponse({"error": {"code": f"http_{error.status_code}", "message": str(error.detail)}},
                            status_code=error.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception):
        log.error("unhandled error", error=repr(error), exc_info=error)
        return JSONResponse({"error": {"code": "internal_error", "message": "internal error (logged)"}},
                            status_code=500)


class BodyLimitMiddleware:
    """Pure ASGI: refuses a request body larger than ``max_bytes`` with 413 ``request_too_large`` before the app
    parses it: at once by Content-Length, else (chunked) while the bytes arrive; the app then sees a disconnect
    and whatever it answers is dropped."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length < 0 or length > self.max_bytes:
                    return await self._too_large(send)
        received = 0
        state = {"started": False, "refused": False}

        async def limited_receive():
            nonlocal received
            if state["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    state["refused"] = True
                    if not state["started"]:
                        state["started"] = True
                        await self._too_large(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if state["refused"]:
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)

    async def _too_large(self, send) -> None:
        body = json.dumps({"error": {"code": "request_too_large",
                                     "message": f"the request body is larger than {self.max_bytes} bytes",
                                     "max_body_bytes": self.max_bytes}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

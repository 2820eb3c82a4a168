"""HTTP pieces shared by the services: the error type, its JSON body ``{"error": {"code", "message", ...}}`` and
the exception handlers every FastAPI app installs (so no request ever gets a bare 500)."""

from __future__ import annotations

import json
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    """An error answer: HTTP ``status``, a stable ``code``, a readable ``message`` and extra body fields."""

    def __init__(self, status: int, code: str, message: str, *, headers: Optional[dict] = None, **extra):
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.extra = status, code, message, headers or {}, extra

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


def validation_message(error) -> str:
    """One readable line from a pydantic/FastAPI validation error: ``field: reason; field: reason``."""
    parts = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item.get("loc", ()) if p not in ("body", "query", "path", "header"))
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
    async def _http(_: Request, error: StarletteHTTPException):
        return JSONResponse({"error": {"code": f"http_{error.status_code}", "message": str(error.detail)}},
                            status_code=error.status_code, headers=getattr(error, "headers", None))

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

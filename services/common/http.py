"""HTTP pieces shared by the services: the error type, its JSON body ``{"error": {"code", "message", ...}}`` and
the exception handlers every FastAPI app installs (so no request ever gets a bare 500)."""

from __future__ import annotations

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

"""Typed errors. Every error the coordinator answers is an :class:`APIError` (or one of its subclasses)."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional


class FarMeshError(Exception):
    """Base class of every error raised by the SDK."""


class APIConnectionError(FarMeshError):
    """The coordinator could not be reached, or the connection broke (including a stream that ended early)."""


class APITimeoutError(APIConnectionError):
    """The request timed out."""


class APIError(FarMeshError):
    """An error answered by the coordinator: ``{"error": {"code", "message", ...}}``.

    ``status_code`` is the HTTP status, or ``None`` for an error reported inside a stream that had already begun
    (an SSE ``event: error``). ``body`` is the ``error`` object with every extra field the server sent.
    """

    def __init__(self, message: str, *, status_code: Optional[int] = None, code: str = "api_error",
                 body: Optional[Mapping[str, Any]] = None, request_id: Optional[str] = None,
                 headers: Optional[Mapping[str, str]] = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code
        self.body: Dict[str, Any] = dict(body or {})
        self.request_id = request_id
        self.headers: Dict[str, str] = dict(headers or {})

    def __str__(self) -> str:
        status = f"{self.status_code} " if self.status_code is not None else ""
        return f"{status}{self.code}: {self.message}"


class AuthenticationError(APIError):
    """401: missing, unknown or revoked API key, or an invalid/expired JWT."""


class InsufficientBalanceError(APIError):
    """402: the prepaid balance cannot cover this request's worst case (``max_tokens`` × price)."""

    @property
    def required_far(self) -> Optional[str]:
        return self.body.get("required_far")

    @property
    def available_far(self) -> Optional[str]:
        return self.body.get("available_far")

    @property
    def shortfall_far(self) -> Optional[str]:
        """How much to deposit (at least) for this request to be admitted."""
        return self.body.get("shortfall_far")

    @property
    def deposit(self) -> Optional[dict]:
        """How to top up: ``{"contract", "token", "account_ref", "confirmations", "how", ...}`` (None when the
        coordinator has no deposit contract)."""
        return self.body.get("deposit")


class RateLimitError(APIError):
    """429: more requests per minute than the key allows. ``retry_after`` is in seconds."""

    def __init__(self, message: str, *, retry_after: Optional[float] = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class SwarmNotReadyError(APIError):
    """503: some blocks of the model have no online server. ``missing_blocks`` lists them."""

    def __init__(self, message: str, *, retry_after: Optional[float] = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after

    @property
    def missing_blocks(self) -> List[int]:
        return list(self.body.get("missing_blocks") or [])

    @property
    def loading_blocks(self) -> List[int]:
        return list(self.body.get("loading_blocks") or [])


class InvalidRequestError(APIError):
    """400/422: the request is invalid (empty prompt, max_tokens out of range, prompt longer than the context...)."""


class NotFoundError(APIError):
    """404: unknown model or request."""


class ConflictError(APIError):
    """409: the ``request_id`` (idempotency key) is in use or still running."""


class GenerationError(APIError):
    """502/504, or an error event inside a stream: the swarm failed while generating."""


def _retry_after(headers: Mapping[str, str], error: Mapping[str, Any]) -> Optional[float]:
    value: Any = headers.get("retry-after")
    if value is None:
        value = error.get("retry_after_s")
    try:
        return max(0.0, float(value)) if value is not None else None
    except (TypeError, ValueError):
        return None  # an HTTP date: not sent by the coordinator; fall back to backoff


def error_from_response(status_code: Optional[int], payload: Any, headers: Optional[Mapping[str, str]] = None,
                        *, request_id: Optional[str] = None) -> APIError:
    """The typed error for an HTTP status and its JSON body (or an in-band stream error when status is None)."""
    lower = {k.lower(): v for k, v in (headers or {}).items()}
    error: Dict[str, Any] = {}
    if isinstance(payload, Mapping) and isinstance(payload.get("error"), Mapping):
        error = dict(payload["error"])
    elif isinstance(payload, Mapping) and "detail" in payload:
        error = {"message": str(payload["detail"])}
    code = str(error.get("code") or (f"http_{status_code}" if status_code else "stream_error"))
    message = str(error.get("message") or (payload if isinstance(payload, str) and payload else
                                           f"the coordinator answered {status_code}"))
    common: Dict[str, Any] = dict(status_code=status_code, code=code, body=error, request_id=request_id,
                                  headers=lower)
    if status_code == 401 or code == "invalid_credentials":
        return AuthenticationError(message, **common)
    if status_code == 402 or code == "insufficient_balance":
        return InsufficientBalanceError(message, **common)
    if status_code == 429 or code == "rate_limited":
        return RateLimitError(message, retry_after=_retry_after(lower, error), **common)
    if status_code == 503 or code == "swarm_not_ready":
        return SwarmNotReadyError(message, retry_after=_retry_after(lower, error), **common)
    if status_code in (400, 422):
        return InvalidRequestError(message, **common)
    if status_code == 404:
        return NotFoundError(message, **common)
    if status_code == 409:
        return ConflictError(message, **common)
    if status_code in (502, 504) or status_code is None:
        return GenerationError(message, **common)
    return APIError(message, **common)

"""What the sync and async clients share: settings, request bodies, retry delays, the stream's state machine."""

from __future__ import annotations

import json
import os
import random
import uuid
from dataclasses import replace
from decimal import Decimal
from typing import Any, Dict, List, Mapping, Optional, Tuple

import httpx

from farlabs._errors import APIConnectionError, APIError, error_from_response
from farlabs._types import ChatResponse, PromptOrMessages, TokenEvent, TokenLogprob

__version__ = "0.1.0"

DEFAULT_BASE_URL = "http://127.0.0.1:8100"
DEFAULT_TIMEOUT = 600.0
DEFAULT_MAX_RETRIES = 2
GENERATE_PATH = "/mesh/inference/generate"
RETRY_STATUSES = frozenset({429, 503})
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 8.0

SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "logit_bias", "logprobs", "stop", "seed", "model_id", "request_id", "user_wallet")


def resolve_settings(api_key: Optional[str], base_url: Optional[str]) -> Tuple[Optional[str], str]:
    """Explicit arguments first, then ``FARLABS_API_KEY`` / ``FARLABS_BASE_URL``, then the local default."""
    key = api_key if api_key is not None else os.environ.get("FARLABS_API_KEY") or None
    url = base_url or os.environ.get("FARLABS_BASE_URL") or DEFAULT_BASE_URL
    return key, url.rstrip("/")


def make_timeout(timeout: Any) -> httpx.Timeout:
    if isinstance(timeout, httpx.Timeout):
        return timeout
    if timeout is None:
        return httpx.Timeout(None)
    return httpx.Timeout(float(timeout), connect=min(float(timeout), 10.0))


def default_headers(api_key: Optional[str], extra: Optional[Mapping[str, str]]) -> Dict[str, str]:
    headers = {"User-Agent": f"farlabs-python/{__version__}", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    headers.update(extra or {})
    return headers


def new_request_id() -> str:
    """A client-side request ID (the server's idempotency key): known before the first token, so a stream can
    be cancelled at once, and a retried request can never run twice."""
    return f"req_{uuid.uuid4().hex}"


def build_payload(prompt_or_messages: PromptOrMessages, *, stream: bool, model: Optional[str] = None,
                  **sampling: Any) -> Dict[str, Any]:
    """The JSON body of ``POST /mesh/inference/generate``. ``None`` values are left out (server defaults)."""
    unknown = set(sampling) - set(SAMPLING_KEYS)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}; "
                        f"known: model, {', '.join(SAMPLING_KEYS)}")
    body: Dict[str, Any] = {}
    if isinstance(prompt_or_messages, str):
        body["prompt"] = prompt_or_messages
    elif isinstance(prompt_or_messages, (list, tuple)) and all(isinstance(m, Mapping) for m in prompt_or_messages):
        body["messages"] = [dict(m) for m in prompt_or_messages]
    else:
        raise TypeError("prompt_or_messages must be a string or a list of {'role', 'content'} messages")
    if model is not None:
        sampling.setdefault("model_id", model)
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = [sampling["stop"]]
    if sampling.get("logit_bias") is not None:  # JSON object keys are strings: {token id: bias}
        sampling["logit_bias"] = {str(token): bias for token, bias in sampling["logit_bias"].items()}
    body.update({k: v for k, v in sampling.items() if v is not None})
    body.setdefault("request_id", new_request_id())
    body["stream"] = stream
    return body


def parse_error(response: httpx.Response, request_id: Optional[str] = None) -> APIError:
    """The typed error of a non-2xx response (its body must have been read)."""
    try:
        payload: Any = response.json()
    except ValueError:
        payload = response.text
    return error_from_response(response.status_code, payload, response.headers, request_id=request_id)


def retry_delay(attempt: int, error: Optional[APIError] = None) -> float:
    """Seconds to wait before retry number ``attempt + 1``: the server's ``Retry-After`` when it sent one, else
    exponential backoff with jitter."""
    retry_after: Optional[float] = getattr(error, "retry_after", None)
    if retry_after is not None:
        return float(retry_after)
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * (2.0 ** attempt)) * (1 + random.random() * 0.25)


def is_retryable(error: APIError) -> bool:
    return error.status_code in RETRY_STATUSES


class StreamState:
    """Folds SSE events into tokens and the final :class:`ChatResponse`."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.text = ""
        self.tokens_generated = 0
        self.cost_far = Decimal(0)
        self.response: Optional[ChatResponse] = None
        self.last_event: Optional[TokenEvent] = None
        self.logprobs: List[TokenLogprob] = []  # of the token events, when the request asked for them

    def feed(self, event: str, data: str) -> List[str]:
        """The tokens to hand to the caller for one SSE event; raises the typed error of an ``error`` event."""
        if event not in ("", "message", "error"):
            return []  # keep-alives and event kinds this SDK does not know
        try:
            payload = json.loads(data) if data else {}
        except ValueError as error:
            raise APIConnectionError(f"malformed event from the coordinator: {data[:200]!r}") from error
        if event == "error" or (isinstance(payload, Mapping) and "error" in payload and "done" not in payload):
            raise error_from_response(None, payload, request_id=self.request_id)
        if not isinstance(payload, Mapping):
            return []
        if payload.get("done"):
            self.response = ChatResponse.from_json(payload)
            if self.response.logprobs is None and self.logprobs:
                self.response = replace(self.response, logprobs=list(self.logprobs))
            self.request_id = self.response.request_id or self.request_id
            self.cost_far = self.response.cost_far
            self.tokens_generated = self.response.usage.completion_tokens
            final_text = self.response.text
            # A replayed request (same request_id, already finished) sends only the final event: hand its text on
            # so that the streamed tokens always add up to the final text.
            if final_text.startswith(self.text) and len(final_text) > len(self.text):
                rest = final_text[len(self.text):]
                self.text = final_text
                return [rest]
            return []
        token = TokenEvent.from_json(payload)
        self.last_event = token
        if token.logprobs is not None:
            self.logprobs.append(token.logprobs)
        self.request_id = token.request_id or self.request_id
        self.tokens_generated = token.tokens_generated
        self.cost_far = token.cost_far
        if not token.token:
            return []
        self.text += token.token
        return [token.token]

    def finish(self) -> ChatResponse:
        if self.response is None:
            raise APIConnectionError(f"the stream of request {self.request_id} ended before its final event "
                                     f"(after {self.tokens_generated} tokens)")
        return self.response

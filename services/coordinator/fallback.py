"""Fallback to centralized inference (docs/fallback.md): while a model's swarm is not ready, its requests go to an
upstream OpenAI-compatible API (a vLLM or llama.cpp server, another coordinator) named in FALLBACK_ENDPOINTS.

Pure parts: the upstream request of a ``GenerateRequest``, the parsing of a stream chunk, the billing rule.
``FallbackClient`` is the serving object: one ``httpx.AsyncClient`` per endpoint, always streaming (SSE read with
httpx-sse), so a non-streaming client and a partial answer are handled like the swarm's. The session, the charge
and the metrics are the serving layer's (services/coordinator/serving.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import AsyncIterator, Optional
from urllib.parse import urlsplit

import httpx
from httpx_sse import EventSource, SSEError

from services.common.config import FallbackEndpoint
from services.common.states import FinishReason
from services.coordinator.protocol import GenerateRequest
from services.coordinator.store import Pricing

# No provider computed anything: the platform keeps the whole charge (and pays the upstream itself), so
# finalize_session() sets fee = cost and "cost = fee + Σ payments" holds (database/migrations/0008).
FALLBACK_FEE_BPS = 10_000
ERROR_BODY_LIMIT = 2_000  # characters of an upstream error body quoted in our message


class FallbackFailed(Exception):
    """The upstream could not serve: ``code`` is ``fallback_error`` (HTTP 502) or ``fallback_timeout`` (504)."""

    STATUS = {"fallback_error": 502, "fallback_timeout": 504}

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    @property
    def status(self) -> int:
        return self.STATUS[self.code]


@dataclass(frozen=True)
class UpstreamChunk:
    text: str = ""
    finish_reason: Optional[str] = None
    completion_tokens: Optional[int] = None  # from the usage chunk (stream_options.include_usage)


def upstream_request(request: GenerateRequest, model_name: str) -> tuple[str, dict]:
    """(path under the base URL, JSON body): ``messages`` go to chat/completions, a ``prompt`` to completions.
    Always streamed with usage. ``top_k`` is not an OpenAI parameter: sent only when the client set it (vLLM,
    llama.cpp and far-mesh accept it)."""
    body = {"model": model_name, "max_tokens": request.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "logit_bias"):
        if getattr(request, name) is not None:  # omitted: the upstream's own default for its model
            body[name] = getattr(request, name)
    if request.stop:
        body["stop"] = list(request.stop)
    if request.seed is not None:
        body["seed"] = request.seed
    if request.top_k:
        body["top_k"] = request.top_k
    if request.messages is None:
        return "completions", {**body, "prompt": request.prompt}
    # "developer" is rendered as "system" locally too (openai_protocol.render_chat); older servers reject it
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in request.messages]
    return "chat/completions", {**body, "messages": messages}


def parse_chunk(data: object) -> UpstreamChunk:
    """One ``data:`` object of an OpenAI stream (chat or completions). An in-band error raises FallbackFailed."""
    if not isinstance(data, dict):
        raise FallbackFailed("fallback_error", "the fallback API sent a stream event that is not a JSON object")
    if data.get("error"):
        error = data["error"]
        message = error.get("message") if isinstance(error, dict) else str(error)
        raise FallbackFailed("fallback_error", f"the fallback API failed mid-stream: {message}")
    text, finish_reason = "", None
    choices = data.get("choices") or []
    if choices and isinstance(choices[0], dict):
        choice = choices[0]
        delta = choice.get("delta") or {}
        text = (delta.get("content") if isinstance(delta, dict) else None) or choice.get("text") or ""
        finish_reason = choice.get("finish_reason")
    usage = data.get("usage") or {}
    completion = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return UpstreamChunk(text if isinstance(text, str) else "", finish_reason,
                         completion if isinstance(completion, int) and completion >= 0 else None)


def finish_reason_of(upstream: Optional[str]) -> FinishReason:
    """The finish reason of a fallback answer: the upstream's "length" is ours, any other end is a stop."""
    return FinishReason.LENGTH if upstream == "length" else FinishReason.STOP


def billed_tokens(*, completed: bool, reported_completion: Optional[int], delivered: int, prompt_tokens: int,
                  max_tokens: int) -> tuple[int, int]:
    """(prompt tokens, completion tokens) charged for an upstream answer.

    Prompt tokens are the coordinator's own count (what the balance was reserved for). A completed answer is
    billed on the upstream's usage (else the chunks delivered: one token each for vLLM, llama.cpp and far-mesh);
    a cancelled or failed one only for the chunks delivered, and nothing at all when none was. Never more than
    ``max_tokens``: the reservation covers that much."""
    if delivered == 0 and not completed:
        return 0, 0
    completion = reported_completion if completed and reported_completion is not None else delivered
    return prompt_tokens, min(completion, max_tokens)


class FallbackClient:
    def __init__(self, endpoint: FallbackEndpoint, model_id: str):
        self.endpoint = endpoint
        self.model_name = endpoint.model or model_id
        self.host = urlsplit(endpoint.url).netloc  # named in error messages (never the key)
        headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        self.http = httpx.AsyncClient(base_url=endpoint.url.rstrip("/") + "/", headers=headers,
                                      timeout=httpx.Timeout(endpoint.timeout_s))
        self.pricing = Pricing(endpoint.price_per_token_far, endpoint.price_per_prompt_token_far, FALLBACK_FEE_BPS)

    async def open(self, request: GenerateRequest) -> httpx.Response:
        """Send the request; returns the streaming response once its status is 200, else FallbackFailed."""
        path, body = upstream_request(request, self.model_name)
        try:
            response = await self.http.send(self.http.build_request("POST", path, json=body), stream=True)
        except httpx.TimeoutException:
            raise FallbackFailed("fallback_timeout", f"the fallback API at {self.host} did not answer within "
                                                     f"{self.endpoint.timeout_s:g} s") from None
        except httpx.HTTPError as error:
            raise FallbackFailed("fallback_error", f"the fallback API at {self.host} could not be reached "
                                                   f"({type(error).__name__}: {error})") from None
        if response.status_code != 200:
            try:
                detail = await self._error_detail(response)
            finally:
                await response.aclose()
            raise FallbackFailed("fallback_error",
                                 f"the fallback API at {self.host} answered HTTP {response.status_code}: {detail}")
        return response

    @staticmethod
    async def _error_detail(response: httpx.Response) -> str:
        try:
            raw = (await response.aread()).decode(errors="replace")[:ERROR_BODY_LIMIT]
        except httpx.HTTPError as error:
            return f"(body unreadable: {type(error).__name__})"
        try:
            error = json.loads(raw).get("error")
            if isinstance(error, dict) and error.get("message"):
                return str(error["message"])
        except (ValueError, AttributeError):
            pass
        return raw.strip() or "(empty body)"

    async def chunks(self, response: httpx.Response) -> AsyncIterator[UpstreamChunk]:
        """The chunks of an open response until ``[DONE]``; the response is closed however this ends."""
        try:
            async for sse in EventSource(response).aiter_sse():
                if sse.data.strip() == "[DONE]":
                    return
                if not sse.data.strip():
                    continue
                try:
                    data = json.loads(sse.data)
                except ValueError:
                    raise FallbackFailed("fallback_error", "the fallback API sent an event that is not JSON") from None
                yield parse_chunk(data)
            raise FallbackFailed("fallback_error", "the fallback API closed the stream before it finished")
        except httpx.TimeoutException:
            raise FallbackFailed("fallback_timeout", f"the fallback API at {self.host} sent nothing for "
                                                     f"{self.endpoint.timeout_s:g} s") from None
        except SSEError as error:  # before HTTPError: httpx-sse's error is a TransportError
            raise FallbackFailed("fallback_error", f"the fallback API did not answer with an event stream "
                                                   f"({error})") from None
        except httpx.HTTPError as error:
            raise FallbackFailed("fallback_error", f"the connection to the fallback API at {self.host} was lost "
                                                   f"mid-stream ({type(error).__name__})") from None
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

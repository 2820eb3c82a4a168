"""The clients: :class:`FarMesh` (sync) and :class:`AsyncFarMesh` (asyncio), over httpx + httpx-sse."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any, AsyncGenerator, AsyncIterator, Dict, Generator, Iterator, List, Mapping, Optional, Union

import httpx
from httpx_sse import EventSource

from farlabs._base import (DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, GENERATE_PATH, StreamState, build_payload,
                           default_headers, is_retryable, make_timeout, parse_error, resolve_settings, retry_delay)
from farlabs._errors import APIConnectionError, APIError, APITimeoutError
from farlabs._types import (AccountUsage, Balance, ChatResponse, Contribution, FinishReason, InferenceStatus, Model,
                            PromptOrMessages, Usage)

_sleep = time.sleep  # module-level so tests can replace it
_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)  # the request never reached the server: safe to retry
TimeoutTypes = Union[float, httpx.Timeout, None]


def _usage_path(limit: int, before: Optional[str], days: int) -> str:
    from urllib.parse import urlencode

    query = {"limit": limit, "days": days}
    if before:
        query["before"] = before
    return "/mesh/account/usage?" + urlencode(query)


def _translate(error: httpx.HTTPError) -> APIConnectionError:
    if isinstance(error, httpx.TimeoutException):
        return APITimeoutError(f"request timed out: {error!r}")
    return APIConnectionError(f"connection to the coordinator failed: {error!r}")


class _ClientBase:
    def __init__(self, api_key: Optional[str], base_url: Optional[str], timeout: TimeoutTypes, max_retries: int,
                 headers: Optional[Mapping[str, str]]) -> None:
        self.api_key, self.base_url = resolve_settings(api_key, base_url)
        self.timeout = make_timeout(timeout)
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.max_retries = max_retries
        self._extra_headers = dict(headers or {})
        self._headers = default_headers(self.api_key, headers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, max_retries={self.max_retries})"


class _StreamView:
    """Read-only views shared by both stream classes (``_state`` is a :class:`StreamState`)."""

    _state: StreamState

    @property
    def request_id(self) -> str:
        """Known before the first token (the SDK sends one): pass it to ``cancel()`` from anywhere."""
        return self._state.request_id

    @property
    def text(self) -> str:
        """The text streamed so far."""
        return self._state.text

    @property
    def tokens_generated(self) -> int:
        return self._state.tokens_generated

    @property
    def cost_far(self) -> Decimal:
        """The running cost while the stream goes on; the final cost once it ended."""
        return self._state.cost_far

    @property
    def response(self) -> Optional[ChatResponse]:
        """The final result (text, usage, cost, contributions) once the stream ended; ``None`` before."""
        return self._state.response

    @property
    def finish_reason(self) -> Optional[FinishReason]:
        return self._state.response.finish_reason if self._state.response else None

    @property
    def usage(self) -> Optional[Usage]:
        return self._state.response.usage if self._state.response else None

    @property
    def contributions(self) -> List[Contribution]:
        return self._state.response.contributions if self._state.response else []


# ------------------------------------------------------------------------------------------------------ sync
class ChatStream(_StreamView, Iterator[str]):
    """Iterate it for the tokens (non-empty strings). When it ends, :attr:`response` holds the final
    :class:`ChatResponse`. ``cancel()`` asks the coordinator to stop (the stream then ends with finish_reason
    ``"cancelled"``); ``close()`` drops the connection, which cancels too. Use it as a context manager."""

    def __init__(self, client: "FarMesh", payload: Dict[str, Any]) -> None:
        self._client = client
        self._state = StreamState(payload["request_id"])
        self._http_response = client._send("POST", GENERATE_PATH, json=payload, stream=True)
        self._tokens = self._iterate()

    def _iterate(self) -> Generator[str, None, None]:
        try:
            for sse in EventSource(self._http_response).iter_sse():
                yield from self._state.feed(sse.event, sse.data)
                if self._state.response is not None:
                    break
            self._state.finish()
        except httpx.HTTPError as error:
            raise _translate(error) from error
        finally:
            self._http_response.close()

    def __iter__(self) -> "ChatStream":
        return self

    def __next__(self) -> str:
        return next(self._tokens)

    def get_final_response(self) -> ChatResponse:
        """Consume what is left of the stream and return the final result."""
        for _ in self:
            pass
        return self._state.finish()

    def cancel(self) -> str:
        """Cancel on the coordinator (takes effect within one token step); keep iterating to get the final usage."""
        return self._client.cancel(self.request_id)

    def close(self) -> None:
        """Drop the connection (the coordinator cancels the generation)."""
        self._tokens.close()
        self._http_response.close()

    def __enter__(self) -> "ChatStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class FarMesh(_ClientBase):
    """Client of a Far Mesh coordinator.

    ``api_key`` and ``base_url`` default to ``FARLABS_API_KEY`` and ``FARLABS_BASE_URL`` (then
    ``http://127.0.0.1:8100``). Requests answered 429 or 503 are retried up to ``max_retries`` times, waiting what
    the server's ``Retry-After`` says (exponential backoff otherwise); a stream that began is never retried.
    """

    def __init__(self, api_key: Optional[str] = None, *, base_url: Optional[str] = None,
                 timeout: TimeoutTypes = DEFAULT_TIMEOUT, max_retries: int = DEFAULT_MAX_RETRIES,
                 headers: Optional[Mapping[str, str]] = None, http_client: Optional[httpx.Client] = None) -> None:
        super().__init__(api_key, base_url, timeout, max_retries, headers)
        self._owns_client = http_client is None
        self._client = http_client or httpx.Client(timeout=self.timeout)

    # ------------------------------------------------------------------------------------------ transport
    def _send(self, method: str, path: str, *, json: Any = None, stream: bool = False) -> httpx.Response:
        headers = dict(self._headers)
        if stream:
            headers.update({"Accept": "text/event-stream", "Cache-Control": "no-store"})
        request_id = json.get("request_id") if isinstance(json, dict) else None
        attempt = 0
        while True:
            request = self._client.build_request(method, self.base_url + path, json=json, headers=headers,
                                                 timeout=self.timeout)
            try:
                response = self._client.send(request, stream=stream)
            except _CONNECT_ERRORS as error:
                if attempt < self.max_retries:
                    _sleep(retry_delay(attempt))
                    attempt += 1
                    continue
                raise _translate(error) from error
            except httpx.HTTPError as error:
                raise _translate(error) from error
            if response.is_success:
                return response
            try:
                response.read()
            except httpx.HTTPError as error:
                raise _translate(error) from error
            finally:
                response.close()
            api_error = parse_error(response, request_id)
            if is_retryable(api_error) and attempt < self.max_retries:
                _sleep(retry_delay(attempt, api_error))
                attempt += 1
                continue
            raise api_error

    def _json(self, method: str, path: str, *, json: Any = None) -> Any:
        response = self._send(method, path, json=json)
        try:
            return response.json()
        except ValueError as error:
            raise APIError(f"the coordinator answered non-JSON: {response.text[:200]!r}",
                           status_code=response.status_code, code="invalid_response") from error

    # ------------------------------------------------------------------------------------------------ API
    def chat(self, prompt_or_messages: PromptOrMessages, *, model: Optional[str] = None,
             **sampling: Any) -> ChatResponse:
        """Generate and wait for the whole text. ``prompt_or_messages`` is a prompt string or a list of
        ``{"role": "system"|"user"|"assistant", "content": ...}`` messages. Sampling: ``max_tokens``,
        ``temperature`` (0 = greedy), ``top_p``, ``top_k``, ``repetition_penalty`` (each omitted: the model's
        recommended value), ``presence_penalty``, ``frequency_penalty``, ``logit_bias`` ({token id: -100..100}),
        ``logprobs`` (k: :attr:`ChatResponse.logprobs` has each token's log-probability and the k most likely),
        ``stop`` (str or list), ``seed``; also ``request_id`` (idempotency key; generated when omitted) and
        ``user_wallet``."""
        payload = build_payload(prompt_or_messages, stream=False, model=model, **sampling)
        return ChatResponse.from_json(self._json("POST", GENERATE_PATH, json=payload))

    def chat_stream(self, prompt_or_messages: PromptOrMessages, *, model: Optional[str] = None,
                    **sampling: Any) -> ChatStream:
        """Start a streamed generation (errors before the first token are raised here) and return a
        :class:`ChatStream` yielding tokens. Same arguments as :meth:`chat`."""
        return ChatStream(self, build_payload(prompt_or_messages, stream=True, model=model, **sampling))

    def chat_stream_async(self, prompt_or_messages: PromptOrMessages, *, model: Optional[str] = None,
                          **sampling: Any) -> "AsyncChatStream":
        """The streamed generation of :meth:`chat_stream` for asyncio code that holds a sync :class:`FarMesh`:
        ``async for token in mesh.chat_stream_async(...)`` (or ``async with``). The stream has an
        ``httpx.AsyncClient`` of its own (same key, URL, timeout, retries, headers), closed when the stream ends,
        fails or is closed. Same arguments as :meth:`chat`; for many async calls use :class:`AsyncFarMesh`."""
        client = AsyncFarMesh(self.api_key, base_url=self.base_url, timeout=self.timeout,
                              max_retries=self.max_retries, headers=self._extra_headers)
        return AsyncChatStream(client, build_payload(prompt_or_messages, stream=True, model=model, **sampling),
                               owns_client=True)

    def cancel(self, request_id: str) -> str:
        """Cancel a running request; returns ``"cancelling"`` or, if it already ended, its final status."""
        return str(self._json("DELETE", f"/mesh/inference/{request_id}").get("status"))

    def status(self, request_id: str) -> InferenceStatus:
        return InferenceStatus.from_json(self._json("GET", f"/mesh/inference/{request_id}"))

    def models(self) -> List[Model]:
        return [Model.from_json(m) for m in self._json("GET", "/v1/models").get("data", [])]

    def balance(self) -> Balance:
        """The account's balance, reserved and available FAR, and how to deposit (``GET /mesh/account``)."""
        return Balance.from_json(self._json("GET", "/mesh/account"))

    def usage(self, *, limit: int = 50, before: Optional[str] = None, days: int = 30) -> AccountUsage:
        """Recent requests with tokens, cost and nodes, daily sums and totals (``GET /mesh/account/usage``)."""
        return AccountUsage.from_json(self._json("GET", _usage_path(limit, before, days)))

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> "FarMesh":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------- async
class AsyncChatStream(_StreamView, AsyncIterator[str]):
    """``async for token in client.chat_stream(...)``. The request starts on ``async with`` or at the first
    iteration (errors before the first token are raised there). Otherwise like :class:`ChatStream`."""

    def __init__(self, client: "AsyncFarMesh", payload: Dict[str, Any], *, owns_client: bool = False) -> None:
        self._client = client
        self._payload = payload
        self._state = StreamState(payload["request_id"])
        self._http_response: Optional[httpx.Response] = None
        self._tokens: Optional[AsyncGenerator[str, None]] = None
        self._closed = False
        self._owns_client = owns_client  # FarMesh.chat_stream_async: the client lives as long as the stream

    async def start(self) -> "AsyncChatStream":
        """Send the request now (idempotent)."""
        if self._tokens is None:
            try:
                self._http_response = await self._client._send("POST", GENERATE_PATH, json=self._payload,
                                                                stream=True)
            except BaseException:
                await self._release_client()
                raise
            self._tokens = self._iterate(self._http_response)
        return self

    async def _release_client(self) -> None:
        if self._owns_client:
            self._owns_client = False
            await self._client.close()

    async def _iterate(self, response: httpx.Response) -> AsyncGenerator[str, None]:
        try:
            async for sse in EventSource(response).aiter_sse():
                for token in self._state.feed(sse.event, sse.data):
                    yield token
                if self._state.response is not None:
                    break
            self._state.finish()
        except httpx.HTTPError as error:
            raise _translate(error) from error
        finally:
            await response.aclose()

    def __aiter__(self) -> "AsyncChatStream":
        return self

    async def __anext__(self) -> str:
        if self._closed:
            raise StopAsyncIteration
        await self.start()
        assert self._tokens is not None
        try:
            return await self._tokens.__anext__()
        except BaseException:  # the end of the stream, or its failure
            if self._http_response is not None:
                await self._http_response.aclose()
            await self._release_client()
            raise

    async def get_final_response(self) -> ChatResponse:
        async for _ in self:
            pass
        return self._state.finish()

    async def cancel(self) -> str:
        return await self._client.cancel(self.request_id)

    async def close(self) -> None:
        self._closed = True
        try:
            if self._tokens is not None:
                await self._tokens.aclose()
            if self._http_response is not None:
                await self._http_response.aclose()
        finally:
            await self._release_client()

    async def __aenter__(self) -> "AsyncChatStream":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class AsyncFarMesh(_ClientBase):
    """The asyncio client; same arguments and methods as :class:`FarMesh` (``chat_stream`` returns an
    :class:`AsyncChatStream` to use with ``async for``)."""

    def __init__(self, api_key: Optional[str] = None, *, base_url: Optional[str] = None,
                 timeout: TimeoutTypes = DEFAULT_TIMEOUT, max_retries: int = DEFAULT_MAX_RETRIES,
                 headers: Optional[Mapping[str, str]] = None,
                 http_client: Optional[httpx.AsyncClient] = None) -> None:
        super().__init__(api_key, base_url, timeout, max_retries, headers)
        self._owns_client = http_client is None
        self._client = http_client or httpx.AsyncClient(timeout=self.timeout)

    async def _send(self, method: str, path: str, *, json: Any = None, stream: bool = False) -> httpx.Response:
        headers = dict(self._headers)
        if stream:
            headers.update({"Accept": "text/event-stream", "Cache-Control": "no-store"})
        request_id = json.get("request_id") if isinstance(json, dict) else None
        attempt = 0
        while True:
            request = self._client.build_request(method, self.base_url + path, json=json, headers=headers,
                                                 timeout=self.timeout)
            try:
                response = await self._client.send(request, stream=stream)
            except _CONNECT_ERRORS as error:
                if attempt < self.max_retries:
                    await asyncio.sleep(retry_delay(attempt))
                    attempt += 1
                    continue
                raise _translate(error) from error
            except httpx.HTTPError as error:
                raise _translate(error) from error
            if response.is_success:
                return response
            try:
                await response.aread()
            except httpx.HTTPError as error:
                raise _translate(error) from error
            finally:
                await response.aclose()
            api_error = parse_error(response, request_id)
            if is_retryable(api_error) and attempt < self.max_retries:
                await asyncio.sleep(retry_delay(attempt, api_error))
                attempt += 1
                continue
            raise api_error

    async def _json(self, method: str, path: str, *, json: Any = None) -> Any:
        response = await self._send(method, path, json=json)
        try:
            return response.json()
        except ValueError as error:
            raise APIError(f"the coordinator answered non-JSON: {response.text[:200]!r}",
                           status_code=response.status_code, code="invalid_response") from error

    async def chat(self, prompt_or_messages: PromptOrMessages, *, model: Optional[str] = None,
                   **sampling: Any) -> ChatResponse:
        payload = build_payload(prompt_or_messages, stream=False, model=model, **sampling)
        return ChatResponse.from_json(await self._json("POST", GENERATE_PATH, json=payload))

    def chat_stream(self, prompt_or_messages: PromptOrMessages, *, model: Optional[str] = None,
                    **sampling: Any) -> AsyncChatStream:
        return AsyncChatStream(self, build_payload(prompt_or_messages, stream=True, model=model, **sampling))

    async def cancel(self, request_id: str) -> str:
        return str((await self._json("DELETE", f"/mesh/inference/{request_id}")).get("status"))

    async def status(self, request_id: str) -> InferenceStatus:
        return InferenceStatus.from_json(await self._json("GET", f"/mesh/inference/{request_id}"))

    async def models(self) -> List[Model]:
        return [Model.from_json(m) for m in (await self._json("GET", "/v1/models")).get("data", [])]

    async def balance(self) -> Balance:
        return Balance.from_json(await self._json("GET", "/mesh/account"))

    async def usage(self, *, limit: int = 50, before: Optional[str] = None, days: int = 30) -> AccountUsage:
        return AccountUsage.from_json(await self._json("GET", _usage_path(limit, before, days)))

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> "AsyncFarMesh":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

"""OpenAI-compatible routes (/v1/completions, /v1/chat/completions, /v1/models) over the same serving logic.

The official ``openai`` Python client works unmodified (base_url=http://host:8100/v1, api_key=fl_…). A request
field that is not implemented is a 400 ``unsupported_parameter`` naming it (openai_protocol.REFUSED_FIELDS).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Callable, Optional

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse

from services.common.http import error_responses, json_body, validation_message
from services.coordinator.accounts import Principal
from services.coordinator.api.deps import get_principal, get_service, read_body
from services.coordinator.openai_protocol import (OPENAI_RESPONSES, ChatCompletionRequest, CompletionRequest,
                                                  ModelList, completion_logprobs, openai_finish_reason,
                                                  unsupported_message)
from services.coordinator.protocol import DoneEvent, GenerateRequest, LogprobEntry
from services.coordinator.serving import InferenceService, ServingError
from services.coordinator.structured import UnsupportedSchema
from services.coordinator.tools import ToolCallReader, ToolSpec, tool_spec

router = APIRouter(prefix="/v1")

# (choice index, text, finish_reason, first chunk of the choice?, logprob entries of its tokens since its last
# chunk) -> one OpenAI chunk
ChunkMaker = Callable[[int, Optional[str], Optional[str], bool, list[LogprobEntry]], dict]


def _generate_request(body, prompt: Optional[str], messages=None) -> GenerateRequest:
    try:
        return GenerateRequest(prompt=prompt, messages=messages,
                               max_tokens=body.max_completion_tokens or body.max_tokens or 16,
                               temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                               repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                               frequency_penalty=body.frequency_penalty, logit_bias=body.logit_bias,
                               logprobs=body.logprobs_count(), n=body.n, stop=body.stop_list(), seed=body.seed,
                               model_id=body.model, stream=bool(body.stream),
                               response_format=getattr(body, "response_format", None))
    except ValidationError as error:
        raise ServingError(422, "invalid_request", validation_message(error)) from None


def _usage(final: DoneEvent) -> dict:
    usage = final.usage
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.prompt_tokens_details.cached_tokens}}


def _results(final: DoneEvent) -> list[tuple[int, str, str]]:
    """(index, text, OpenAI finish reason) of every choice."""
    if final.choices is None:
        return [(0, final.text, openai_finish_reason(final.finish_reason))]
    return [(c.index, c.text, openai_finish_reason(c.finish_reason)) for c in final.choices]


async def _openai_stream(events, make_chunk: ChunkMaker, include_usage: bool, model: str, response_id: str,
                         kind: str):
    """OpenAI chunks: per choice one per token with text (a token's logprobs ride with the next chunk of its
    choice that carries text, as text held back for a stop sequence is sent later), then each choice's last chunk
    with its finish reason, then usage, then [DONE]."""
    created = int(time.time())
    try:
        started: set[int] = set()  # choices that sent their first chunk
        pending: dict[int, list[LogprobEntry]] = {}
        async for event in events:
            if isinstance(event, DoneEvent):
                for index, _text, finish in _results(event):
                    last = make_chunk(index, None, finish, index not in started, pending.pop(index, []))
                    yield {"data": json.dumps({**last, "served_by": event.served_by})}
                if include_usage:
                    yield {"data": json.dumps({"id": response_id, "object": kind, "created": created, "model": model,
                                               "choices": [], "usage": _usage(event),
                                               "served_by": event.served_by})}
            else:
                index = event.index or 0
                if event.logprobs is not None:
                    pending.setdefault(index, []).append(event.logprobs)
                if event.token or index not in started:
                    chunk = make_chunk(index, event.token, None, index not in started, pending.pop(index, []))
                    yield {"data": json.dumps(chunk)}
                    started.add(index)
    except ServingError as error:
        yield {"data": json.dumps(error.body())}
    yield {"data": "[DONE]"}


async def _final(events) -> tuple[DoneEvent, dict[int, list[LogprobEntry]]]:
    """The final event and the logprob entries of each choice."""
    final, entries = None, {}
    async for event in events:
        if isinstance(event, DoneEvent):
            final = event
        elif event.logprobs is not None:
            entries.setdefault(event.index or 0, []).append(event.logprobs)
    return final, entries


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


@router.post("/completions", responses=OPENAI_RESPONSES, openapi_extra=json_body(CompletionRequest))
async def completions(raw: Request, service: InferenceService = Depends(get_service),
                      principal: Principal = Depends(get_principal)):
    body = await read_body(raw, CompletionRequest, unsupported_message)  # after authentication
    request = _generate_request(body, body.prompt_text())
    model_id = service.model(request.model_id).model_id
    events = await service.start(request, principal)
    response_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    wants_logprobs = request.logprobs is not None
    offsets: dict[int, int] = {}  # per choice: where its next chunk's first token starts in its text

    def chunk(index, text, finish_reason, _first, entries):
        logprobs = None
        if wants_logprobs:
            logprobs = completion_logprobs(entries, offsets.get(index, 0))
            offsets[index] = offsets.get(index, 0) + sum(len(entry.token) for entry in entries)
        return {"id": response_id, "object": "text_completion", "created": created, "model": model_id,
                "choices": [{"index": index, "text": text or "", "logprobs": logprobs,
                             "finish_reason": finish_reason}]}

    if body.stream:
        return EventSourceResponse(_openai_stream(events, chunk, _include_usage(body), model_id, response_id,
                                                  "text_completion"))
    final, entries = await _final(events)
    choices = [{"index": index, "text": text,
                "logprobs": completion_logprobs(entries.get(index, []), 0) if wants_logprobs else None,
                "finish_reason": finish} for index, text, finish in _results(final)]
    return JSONResponse({"id": response_id, "object": "text_completion", "created": created, "model": model_id,
                         "choices": choices, "usage": _usage(final), "cost_far": final.cost_far,
                         "served_by": final.served_by})


def _chat_logprobs(entries: list[LogprobEntry]) -> dict:
    return {"content": [entry.model_dump() for entry in entries], "refusal": None}


def _tools(body: ChatCompletionRequest) -> Optional[ToolSpec]:
    try:
        return tool_spec(body.tools or [], body.tool_choice, body.parallel_tool_calls)
    except UnsupportedSchema as error:
        raise ServingError(400, "invalid_request", str(error), param="tool_choice") from None


def _tool_finish_reason(reader: ToolCallReader, finish_reason: str) -> str:
    finish = openai_finish_reason(finish_reason)
    return "tool_calls" if reader.calls and finish == "stop" else finish


async def _tool_call_stream(events, tools: ToolSpec, include_usage: bool, model: str, response_id: str,
                            wants_logprobs: bool):
    """Chat chunks of an answer that may call tools: content deltas, then each call as OpenAI streams it (a delta
    with its index, id, type and name, then one with its arguments), finish_reason ``tool_calls``. Logprobs of the
    tokens since the last chunk ride with the next chunk."""
    created = int(time.time())
    reader = ToolCallReader(tools)
    calls_sent = 0
    pending: list[LogprobEntry] = []

    def chunk(delta: dict, finish_reason: Optional[str] = None, **extra) -> dict:
        logprobs = None
        if wants_logprobs:
            logprobs = _chat_logprobs(list(pending))
            pending.clear()
        return {"data": json.dumps({"id": response_id, "object": "chat.completion.chunk", "created": created,
                                    "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                                                                 "finish_reason": finish_reason}], **extra})}

    def deltas(content: str, calls: list) -> list[dict]:
        nonlocal calls_sent
        out = [chunk({"content": content})] if content else []
        for call in calls:
            out.append(chunk({"tool_calls": [{"index": calls_sent, "id": call.id, "type": "function",
                                              "function": {"name": call.name, "arguments": ""}}]}))
            out.append(chunk({"tool_calls": [{"index": calls_sent, "function": {"arguments": call.arguments}}]}))
            calls_sent += 1
        return out

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in events:
            if not isinstance(event, DoneEvent):
                if event.logprobs is not None:
                    pending.append(event.logprobs)
                for item in deltas(*reader.feed(event.token)):
                    yield item
                continue
            for item in deltas(*reader.finish()):
                yield item
            yield chunk({}, _tool_finish_reason(reader, event.finish_reason), served_by=event.served_by)
            if include_usage:
                yield {"data": json.dumps({"id": response_id, "object": "chat.completion.chunk", "created": created,
                                           "model": model, "choices": [], "usage": _usage(event),
                                           "served_by": event.served_by})}
    except ServingError as error:
        yield {"data": json.dumps(error.body())}
    yield {"data": "[DONE]"}


def _tool_call_message(text: str, finish_reason: str, tools: ToolSpec) -> tuple[dict, str]:
    """The assistant message of a whole answer that may call tools, and its finish_reason."""
    reader = ToolCallReader(tools)
    reader.feed(text)
    reader.finish()
    message = {"role": "assistant", "content": reader.content}
    if reader.calls:
        message["tool_calls"] = [call.as_openai() for call in reader.calls]
    return message, _tool_finish_reason(reader, finish_reason)


@router.post("/chat/completions", responses=OPENAI_RESPONSES, openapi_extra=json_body(ChatCompletionRequest))
async def chat_completions(raw: Request, service: InferenceService = Depends(get_service),
                           principal: Principal = Depends(get_principal)):
    body = await read_body(raw, ChatCompletionRequest, unsupported_message)  # after authentication
    model = service.model(body.model)
    tools = _tools(body)
    if tools is not None and tools.calls_allowed and (body.n or 1) > 1:
        raise ServingError(400, "unsupported_parameter", unsupported_message(
            "n", "n", "several choices are not offered together with tools that may be called"), param="n")
    request = _generate_request(body, None, body.messages)
    events = await service.start(request, principal, tools)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    wants_logprobs = request.logprobs is not None
    reads_calls = tools is not None and tools.calls_allowed

    def chunk(index, text, finish_reason, first, entries):
        delta = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        return {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model.model_id,
                "choices": [{"index": index, "delta": delta,
                             "logprobs": _chat_logprobs(entries) if wants_logprobs else None,
                             "finish_reason": finish_reason}]}

    if body.stream:
        if reads_calls:
            return EventSourceResponse(_tool_call_stream(events, tools, _include_usage(body), model.model_id,
                                                         response_id, wants_logprobs))
        return EventSourceResponse(_openai_stream(events, chunk, _include_usage(body), model.model_id, response_id,
                                                  "chat.completion.chunk"))
    final, entries = await _final(events)
    choices = []
    for index, text, finish in _results(final):
        message = {"role": "assistant", "content": text}
        if reads_calls:  # one choice (n > 1 is refused with callable tools)
            message, finish = _tool_call_message(text, final.finish_reason, tools)
        choices.append({"index": index, "message": message,
                        "logprobs": _chat_logprobs(entries.get(index, [])) if wants_logprobs else None,
                        "finish_reason": finish})
    return JSONResponse({"id": response_id, "object": "chat.completion", "created": created, "model": model.model_id,
                         "choices": choices, "usage": _usage(final), "cost_far": final.cost_far,
                         "served_by": final.served_by})


@router.get("/models", response_model=ModelList, responses=error_responses(401))
async def list_models(service: InferenceService = Depends(get_service), _: Principal = Depends(get_principal)):
    data = []
    for info in await service.model_infos():
        coverage = info.coverage
        data.append({"id": info.model_id, "object": "model", "created": 0, "owned_by": "far-mesh",
                     "ready": bool(coverage and coverage.swarm_ready),
                     "missing_blocks": coverage.missing_blocks if coverage else [],
                     "loading_blocks": coverage.loading_blocks if coverage else [],
                     "fallback": info.fallback,
                     "context_length": info.context_length})
    return {"object": "list", "data": data}

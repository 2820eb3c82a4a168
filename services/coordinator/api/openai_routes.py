"""OpenAI-compatible routes (/v1/completions, /v1/chat/completions, /v1/models) over the same serving logic.

The official ``openai`` Python client works unmodified (base_url=http://host:8100/v1, api_key=fl_…).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Optional

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from services.common.http import error_responses, json_body, validation_message
from services.coordinator.accounts import Principal
from services.coordinator.api.deps import get_principal, get_service, read_body
from services.coordinator.openai_protocol import (OPENAI_RESPONSES, ChatCompletionRequest, CompletionRequest,
                                                  ModelList, openai_finish_reason)
from services.coordinator.protocol import DoneEvent, GenerateRequest
from services.coordinator.serving import InferenceService, ServingError
from services.coordinator.structured import UnsupportedSchema
from services.coordinator.tools import ToolCallReader, ToolSpec, tool_spec

router = APIRouter(prefix="/v1")


def _generate_request(body, prompt: Optional[str], messages=None) -> GenerateRequest:
    try:
        return GenerateRequest(prompt=prompt, messages=messages,
                               max_tokens=body.max_completion_tokens or body.max_tokens or 16,
                               temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                               stop=body.stop_list(), seed=body.seed, model_id=body.model,
                               stream=body.stream, response_format=getattr(body, "response_format", None))
    except ValidationError as error:
        raise ServingError(422, "invalid_request", validation_message(error)) from None


def _usage(final: DoneEvent) -> dict:
    usage = final.usage
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


async def _openai_stream(events, make_chunk, include_usage: bool, model: str, response_id: str, kind: str):
    created = int(time.time())
    try:
        first = True
        async for event in events:
            if isinstance(event, DoneEvent):
                last = make_chunk(None, openai_finish_reason(event.finish_reason), first)
                yield {"data": json.dumps({**last, "served_by": event.served_by})}
                if include_usage:
                    yield {"data": json.dumps({"id": response_id, "object": kind, "created": created, "model": model,
                                               "choices": [], "usage": _usage(event),
                                               "served_by": event.served_by})}
            else:
                if event.token or first:
                    yield {"data": json.dumps(make_chunk(event.token, None, first))}
                    first = False
    except ServingError as error:
        yield {"data": json.dumps(error.body())}
    yield {"data": "[DONE]"}


async def _final(events) -> DoneEvent:
    final = None
    async for event in events:
        if isinstance(event, DoneEvent):
            final = event
    return final


@router.post("/completions", responses=OPENAI_RESPONSES, openapi_extra=json_body(CompletionRequest))
async def completions(raw: Request, service: InferenceService = Depends(get_service),
                      principal: Principal = Depends(get_principal)):
    body = await read_body(raw, CompletionRequest)  # after authentication
    request = _generate_request(body, body.prompt_text())
    model_id = service.model(request.model_id).model_id
    events = await service.start(request, principal)
    response_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    def chunk(text, finish_reason, _first):
        return {"id": response_id, "object": "text_completion", "created": created, "model": model_id,
                "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(_openai_stream(events, chunk, include_usage, model_id, response_id,
                                                  "text_completion"))
    final = await _final(events)
    return JSONResponse({"id": response_id, "object": "text_completion", "created": created, "model": model_id,
                         "choices": [{"index": 0, "text": final.text, "logprobs": None,
                                      "finish_reason": openai_finish_reason(final.finish_reason)}],
                         "usage": _usage(final), "cost_far": final.cost_far, "served_by": final.served_by})


def _tools(body: ChatCompletionRequest) -> Optional[ToolSpec]:
    try:
        return tool_spec(body.tools or [], body.tool_choice, body.parallel_tool_calls)
    except UnsupportedSchema as error:
        raise ServingError(400, "invalid_request", str(error), param="tool_choice") from None


def _tool_finish_reason(reader: ToolCallReader, finish_reason: str) -> str:
    finish = openai_finish_reason(finish_reason)
    return "tool_calls" if reader.calls and finish == "stop" else finish


async def _tool_call_stream(events, tools: ToolSpec, include_usage: bool, model: str, response_id: str):
    """Chat chunks of an answer that may call tools: content deltas, then each call as OpenAI streams it (a delta
    with its index, id, type and name, then one with its arguments), finish_reason ``tool_calls``."""
    created = int(time.time())
    reader = ToolCallReader(tools)
    calls_sent = 0

    def chunk(delta: dict, finish_reason: Optional[str] = None, **extra) -> dict:
        return {"data": json.dumps({"id": response_id, "object": "chat.completion.chunk", "created": created,
                                    "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
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


def _tool_call_message(final: DoneEvent, tools: ToolSpec) -> tuple[dict, str]:
    """The assistant message of a whole answer that may call tools, and its finish_reason."""
    reader = ToolCallReader(tools)
    reader.feed(final.text)
    reader.finish()
    message = {"role": "assistant", "content": reader.content}
    if reader.calls:
        message["tool_calls"] = [call.as_openai() for call in reader.calls]
    return message, _tool_finish_reason(reader, final.finish_reason)


@router.post("/chat/completions", responses=OPENAI_RESPONSES, openapi_extra=json_body(ChatCompletionRequest))
async def chat_completions(raw: Request, service: InferenceService = Depends(get_service),
                           principal: Principal = Depends(get_principal)):
    body = await read_body(raw, ChatCompletionRequest)  # after authentication
    model = service.model(body.model)
    tools = _tools(body)
    request = _generate_request(body, None, body.messages)
    events = await service.start(request, principal, tools)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    reads_calls = tools is not None and tools.calls_allowed

    def chunk(text, finish_reason, first):
        delta = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        return {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model.model_id,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if reads_calls:
            return EventSourceResponse(_tool_call_stream(events, tools, include_usage, model.model_id, response_id))
        return EventSourceResponse(_openai_stream(events, chunk, include_usage, model.model_id, response_id,
                                                  "chat.completion.chunk"))
    final = await _final(events)
    message = {"role": "assistant", "content": final.text}
    finish_reason = openai_finish_reason(final.finish_reason)
    if reads_calls:
        message, finish_reason = _tool_call_message(final, tools)
    return JSONResponse({"id": response_id, "object": "chat.completion", "created": created, "model": model.model_id,
                         "choices": [{"index": 0, "message": message, "logprobs": None,
                                      "finish_reason": finish_reason}],
                         "usage": _usage(final), "cost_far": final.cost_far, "served_by": final.served_by})


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

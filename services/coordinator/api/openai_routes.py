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

router = APIRouter(prefix="/v1")

# (text, finish_reason, first chunk?, logprob entries of the tokens since the last chunk) -> one OpenAI chunk
ChunkMaker = Callable[[Optional[str], Optional[str], bool, list[LogprobEntry]], dict]


def _generate_request(body, prompt: Optional[str], messages=None) -> GenerateRequest:
    try:
        return GenerateRequest(prompt=prompt, messages=messages,
                               max_tokens=body.max_completion_tokens or body.max_tokens or 16,
                               temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                               repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                               frequency_penalty=body.frequency_penalty, logit_bias=body.logit_bias,
                               logprobs=body.logprobs_count(), stop=body.stop_list(), seed=body.seed,
                               model_id=body.model, stream=bool(body.stream))
    except ValidationError as error:
        raise ServingError(422, "invalid_request", validation_message(error)) from None


def _usage(final: DoneEvent) -> dict:
    usage = final.usage
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


async def _openai_stream(events, make_chunk: ChunkMaker, include_usage: bool, model: str, response_id: str,
                         kind: str):
    """OpenAI chunks: one per token with text (a token's logprobs ride with the next chunk that carries text, as
    text held back for a stop sequence is sent later), the last with the finish reason, then usage, then [DONE]."""
    created = int(time.time())
    try:
        first = True
        pending: list[LogprobEntry] = []
        async for event in events:
            if isinstance(event, DoneEvent):
                last = make_chunk(None, openai_finish_reason(event.finish_reason), first, pending)
                yield {"data": json.dumps({**last, "served_by": event.served_by})}
                if include_usage:
                    yield {"data": json.dumps({"id": response_id, "object": kind, "created": created, "model": model,
                                               "choices": [], "usage": _usage(event),
                                               "served_by": event.served_by})}
            else:
                if event.logprobs is not None:
                    pending.append(event.logprobs)
                if event.token or first:
                    yield {"data": json.dumps(make_chunk(event.token, None, first, pending))}
                    first, pending = False, []
    except ServingError as error:
        yield {"data": json.dumps(error.body())}
    yield {"data": "[DONE]"}


async def _final(events) -> tuple[DoneEvent, list[LogprobEntry]]:
    final, entries = None, []
    async for event in events:
        if isinstance(event, DoneEvent):
            final = event
        elif event.logprobs is not None:
            entries.append(event.logprobs)
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
    offset = [0]  # where the next chunk's first token starts in the completion's text

    def chunk(text, finish_reason, _first, entries):
        logprobs = None
        if wants_logprobs:
            logprobs = completion_logprobs(entries, offset[0])
            offset[0] += sum(len(entry.token) for entry in entries)
        return {"id": response_id, "object": "text_completion", "created": created, "model": model_id,
                "choices": [{"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}]}

    if body.stream:
        return EventSourceResponse(_openai_stream(events, chunk, _include_usage(body), model_id, response_id,
                                                  "text_completion"))
    final, entries = await _final(events)
    return JSONResponse({"id": response_id, "object": "text_completion", "created": created, "model": model_id,
                         "choices": [{"index": 0, "text": final.text,
                                      "logprobs": completion_logprobs(entries, 0) if wants_logprobs else None,
                                      "finish_reason": openai_finish_reason(final.finish_reason)}],
                         "usage": _usage(final), "cost_far": final.cost_far, "served_by": final.served_by})


def _chat_logprobs(entries: list[LogprobEntry]) -> dict:
    return {"content": [entry.model_dump() for entry in entries], "refusal": None}


@router.post("/chat/completions", responses=OPENAI_RESPONSES, openapi_extra=json_body(ChatCompletionRequest))
async def chat_completions(raw: Request, service: InferenceService = Depends(get_service),
                           principal: Principal = Depends(get_principal)):
    body = await read_body(raw, ChatCompletionRequest, unsupported_message)  # after authentication
    model = service.model(body.model)
    request = _generate_request(body, None, body.messages)
    events = await service.start(request, principal)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    wants_logprobs = request.logprobs is not None

    def chunk(text, finish_reason, first, entries):
        delta = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        return {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model.model_id,
                "choices": [{"index": 0, "delta": delta,
                             "logprobs": _chat_logprobs(entries) if wants_logprobs else None,
                             "finish_reason": finish_reason}]}

    if body.stream:
        return EventSourceResponse(_openai_stream(events, chunk, _include_usage(body), model.model_id, response_id,
                                                  "chat.completion.chunk"))
    final, entries = await _final(events)
    return JSONResponse({"id": response_id, "object": "chat.completion", "created": created, "model": model.model_id,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": final.text},
                                      "logprobs": _chat_logprobs(entries) if wants_logprobs else None,
                                      "finish_reason": openai_finish_reason(final.finish_reason)}],
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

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
                               model_id=body.model, stream=bool(body.stream))
    except ValidationError as error:
        raise ServingError(422, "invalid_request", validation_message(error)) from None


def _usage(final: DoneEvent) -> dict:
    usage = final.usage
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


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
        return EventSourceResponse(_openai_stream(events, chunk, _include_usage(body), model.model_id, response_id,
                                                  "chat.completion.chunk"))
    final, entries = await _final(events)
    choices = [{"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": _chat_logprobs(entries.get(index, [])) if wants_logprobs else None,
                "finish_reason": finish} for index, text, finish in _results(final)]
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

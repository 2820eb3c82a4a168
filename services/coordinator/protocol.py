"""Pydantic models of the coordinator's wire protocol (docs/generation.md, docs/api-contracts.md)."""

from __future__ import annotations

import re
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# ErrorBody/ErrorDetail: the wire's error shape, re-exported here with the other models of the protocol
from services.common.http import (MAX_SAFE_INTEGER, NOT_BLANK, SSE_EVENT, ErrorBody, ErrorDetail,  # noqa: F401
                                  JsonInt, error_responses, json_int)
from services.common.states import FinishReason, ServedBy, SessionStatus, wire_literal
from services.common.wallets import WALLET_PATTERN

# The state words on the wire: the same words as the tables (services/common/states.py).
FinishReasonWord = wire_literal(FinishReason)
ServedByWord = wire_literal(ServedBy)
SessionStatusWord = wire_literal(SessionStatus)

MAX_TOKENS_LIMIT = 4096
REQUEST_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
# Not a request_id: GET/DELETE /mesh/inference/{request_id} could not tell it from POST /mesh/inference/generate.
RESERVED_REQUEST_IDS = ("generate",)
MAX_STOP_SEQUENCES = 8
MAX_PROMPT_CHARS = 200_000  # a cheap first bound; the model's context bounds it further (serving.py)
MAX_STOP_CHARS = 256  # per stop sequence: the detokenizer holds back and rescans up to this many characters




class ContentPart(BaseModel):
    """An OpenAI content part; only ``{"type": "text", "text": ...}`` parts are read, the others are ignored."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[ContentPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")


# JSON Schema of "some message has text that is not blank" (GenerateRequest's rule, for the OpenAPI document).
_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string", "pattern": NOT_BLANK}}}
SOME_MESSAGE_HAS_TEXT = {"contains": {"type": "object", "required": ["content"], "properties": {"content": {"anyOf": [
    {"type": "string", "pattern": NOT_BLANK}, {"type": "array", "contains": _TEXT_PART}]}}}}


class GenerateRequest(BaseModel):
    """``prompt`` (the native API), or ``messages`` (chat turns rendered with the model's chat template; an extension)."""

    # Exactly one of prompt or messages, as JSON Schema too (null counts as absent, as it does here). Strict: a
    # value of another JSON type is refused, not coerced ("1" is not 1, 0 is not false), as the schema says.
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}}]})

    prompt: Optional[str] = Field(None, max_length=MAX_PROMPT_CHARS, pattern=NOT_BLANK)
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1, max_length=1000,
                                                  json_schema_extra=SOME_MESSAGE_HAS_TEXT)
    max_tokens: JsonInt = Field(100, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: JsonInt = Field(40, ge=0, le=100_000)
    stop: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]] = Field(default_factory=list,
                                                                         max_length=MAX_STOP_SEQUENCES)
    seed: Optional[json_int(ge=0, le=MAX_SAFE_INTEGER)] = None
    model_id: Optional[str] = Field(None, max_length=200)
    request_id: Optional[str] = Field(None, pattern=REQUEST_ID_PATTERN,
                                      json_schema_extra={"not": {"enum": list(RESERVED_REQUEST_IDS)}})
    user_wallet: Optional[str] = Field(None, pattern=WALLET_PATTERN)
    stream: bool = True

    @field_validator("request_id")
    @classmethod
    def _not_reserved(cls, value: Optional[str]) -> Optional[str]:
        if value in RESERVED_REQUEST_IDS:
            raise ValueError(f"{value!r} is reserved (it names the route POST /mesh/inference/{value})")
        return value

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> "GenerateRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.messages is not None and not any(re.search(NOT_BLANK, m.text()) for m in self.messages):
            raise ValueError("messages are empty")
        return self



class Contribution(BaseModel):
    node_id: Optional[str]
    peer_id: str
    wallet_address: Optional[str]
    blocks: str
    work_units: int
    payment_far: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class TokenEvent(BaseModel):
    token: str
    request_id: str
    tokens_generated: int
    cost_far: str


class ReplacedServer(BaseModel):
    """A server that failed a step of the session (failover, docs/generation.md)."""

    peer_id: str
    blocks: str
    cause: Literal["died", "hung", "refused", "distrusted"]  # distrusted: it failed a spot check
    replaced_by: Optional[str]  # None: no live server could take the blocks (the session ended swarm_unavailable)
    stall_ms: Optional[float]


class DoneEvent(BaseModel):
    done: Literal[True] = True
    request_id: str
    finish_reason: FinishReasonWord
    text: str
    usage: Usage
    cost_far: str
    fee_far: str
    contributions: list[Contribution]
    replaced_servers: list[ReplacedServer] = []
    # "fallback": generated by the upstream API of FALLBACK_ENDPOINTS while the swarm was not ready (no contributions)
    served_by: ServedByWord = "swarm"


# What InferenceService.start yields: token events, then one final event (routes serialize them at the edge).
StreamEvent = Union[TokenEvent, DoneEvent]


class InferenceStatus(BaseModel):
    """GET /mesh/inference/{request_id}: a running request (live counts and route) or a finished one."""

    request_id: str
    status: SessionStatusWord
    tokens_generated: int
    cost_far: Optional[str]
    finish_reason: Optional[str] = None
    served_by: ServedByWord
    route: list[dict] = Field(description="the servers of the running session: [{peer_id, blocks}]")
    replaced_servers: list[ReplacedServer]


class CancelResult(BaseModel):
    request_id: str
    status: str = Field(description="'cancelling' when it was running here, else its stored status")


GENERATE_RESPONSES = {
    200: {"model": DoneEvent, "description": "stream=false: the final event. stream=true: Server-Sent Events, "
                                              "one TokenEvent per token, then the DoneEvent (an `error` event "
                                              "with the error shape if it fails after it began)",
          "content": {"text/event-stream": {"schema": SSE_EVENT}}},
    **error_responses(400, 401, 402, 404, 409, 413, 422, 429, 502, 503, 504),
}

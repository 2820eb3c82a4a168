"""Pydantic models of the coordinator's wire protocol (docs/generation.md, docs/api-contracts.md)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator
from pydantic_core import PydanticCustomError

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
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on chat's top_logprobs
MAX_LOGIT_BIAS = 1024
MAX_CHOICES = 8  # n  # entries of logit_bias (each is applied to every step's logits)
# A validation error of this type is a field or value the API does not implement (400 unsupported_parameter on
# the OpenAI routes), not a malformed one.
UNSUPPORTED = "unsupported_parameter"


def _text_only(kind: str) -> str:
    if kind != "text":
        raise PydanticCustomError(UNSUPPORTED, "content parts of type '{kind}' are not supported (text only)",
                                  {"kind": kind})
    return kind


# logit_bias: {"token id": bias}, OpenAI's range -100..100 (-100 bans the token, 100 all but forces it).
LogitBias = Annotated[Optional[dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")],
                                    Annotated[float, Field(ge=-100, le=100)]]],
                      Field(max_length=MAX_LOGIT_BIAS), WithJsonSchema({"anyOf": [
                          {"type": "object", "maxProperties": MAX_LOGIT_BIAS,
                           "propertyNames": {"pattern": "^[0-9]{1,9}$"},
                           "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
                          {"type": "null"}]})]




class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema`` as OpenAI shapes it. The output is always constrained to ``schema`` (with or
    without ``strict``); a schema feature that cannot be enforced is refused (400 ``unsupported_schema``)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Optional[str] = Field(None, max_length=10_000)
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema", description="a JSON Schema (default: any object)")
    strict: Optional[bool] = None


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["json_object"]


class JsonSchemaResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


# ``text`` (default), ``json_object`` (any JSON object) or ``json_schema`` (JSON valid against the schema)
ResponseFormat = Annotated[Union[TextFormat, JsonObjectFormat, JsonSchemaResponseFormat], Field(discriminator="type")]


class ContentPart(BaseModel):
    """An OpenAI content part: only ``{"type": "text", "text": ...}`` parts exist here (another type is refused)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Annotated[str, AfterValidator(_text_only), Field(json_schema_extra={"const": "text"})]
    text: Optional[str] = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(..., max_length=64)
    arguments: str = Field(..., description="the arguments as JSON text")


class MessageToolCall(BaseModel):
    """A call an assistant message made (OpenAI's ``tool_calls`` items), sent back in the conversation."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(..., max_length=200)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[ContentPart], None] = None
    tool_calls: Optional[list[MessageToolCall]] = Field(None, max_length=128, description="assistant: its calls")
    tool_call_id: Optional[str] = Field(None, max_length=200, description="tool: the call this is the result of")

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
    # Sampling: absent (or null) → the model's recommended setting (sampling.sampling_defaults).
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[json_int(ge=0, le=100_000)] = None
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=10.0)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    logit_bias: LogitBias = None
    logprobs: Optional[json_int(ge=0, le=MAX_TOP_LOGPROBS)] = Field(
        None, description="the log-probability of every generated token and of this many most likely ones")
    n: Optional[json_int(ge=1, le=MAX_CHOICES)] = Field(
        None, description="continuations of the prompt (choices), each billed for its own tokens")
    stop: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]] = Field(default_factory=list,
                                                                         max_length=MAX_STOP_SEQUENCES)
    seed: Optional[json_int(ge=0, le=MAX_SAFE_INTEGER)] = None
    model_id: Optional[str] = Field(None, max_length=200)
    request_id: Optional[str] = Field(None, pattern=REQUEST_ID_PATTERN,
                                      json_schema_extra={"not": {"enum": list(RESERVED_REQUEST_IDS)}})
    user_wallet: Optional[str] = Field(None, pattern=WALLET_PATTERN)
    stream: bool = True
    response_format: Optional[ResponseFormat] = None

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


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served from a parked session's attention cache (prefix reuse)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()  # as OpenAI reports it


class TopLogprob(BaseModel):
    """A token and its log-probability, as OpenAI's chat ``logprobs.content[].top_logprobs[]``."""

    token: str
    logprob: float
    bytes: list[int]


class LogprobEntry(TopLogprob):
    """A generated token's log-probability and the most likely tokens at its step (OpenAI's chat
    ``logprobs.content[]``)."""

    top_logprobs: list[TopLogprob]


class TokenEvent(BaseModel):
    token: str
    index: Optional[int] = None  # the choice (only when the request asked for n > 1)
    request_id: str
    tokens_generated: int
    cost_far: str
    logprobs: Optional[LogprobEntry] = None  # only when asked for (omitted from the wire otherwise)


class ReplacedServer(BaseModel):
    """A server that failed a step of the session (failover, docs/generation.md)."""

    peer_id: str
    blocks: str
    cause: Literal["died", "hung", "refused", "distrusted"]  # distrusted: it failed a spot check
    replaced_by: Optional[str]  # None: no live server could take the blocks (the session ended swarm_unavailable)
    stall_ms: Optional[float]


class ChoiceResult(BaseModel):
    """One choice of a request with n > 1."""

    index: int
    text: str
    finish_reason: Optional[FinishReasonWord]  # None: the request failed
    completion_tokens: int


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
    # n > 1: every choice (text and finish_reason above are the first choice's; usage counts all)
    choices: Optional[list[ChoiceResult]] = None

    def wire(self) -> dict:
        """The JSON object sent (``choices`` only when there are several)."""
        return self.model_dump(exclude={"choices"} if self.choices is None else None)


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
    route: list[dict] = Field(description="the servers of the running session: [{peer_id, blocks, rtt_ms, "
                              "step_ms}] (rtt_ms: the coordinator's ping of it; step_ms: its median decode step "
                              "as the coordinator waits for it, round trip included)")
    expected_ms_per_token: Optional[float] = Field(default=None, description="the route's step times (pings "
                                                   "before any step) per token; null when a hop has neither")
    replaced_servers: list[ReplacedServer]
    refunded_far: Optional[str] = Field(None, description="the charge given back to the account because a spot "
                                        "check proved a server's output wrong (docs/verification.md)")


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

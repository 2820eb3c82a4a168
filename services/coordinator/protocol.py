"""Pydantic models of the coordinator's wire protocol (../shared/SPEC.md "Coordinator API")."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.common.wallets import WALLET_PATTERN

MAX_TOKENS_LIMIT = 4096
REQUEST_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 256  # per stop sequence: the detokenizer holds back and rescans up to this many characters


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class GenerateRequest(BaseModel):
    """``prompt`` (SPEC), or ``messages`` (chat turns rendered with the model's chat template; an extension)."""

    model_config = ConfigDict(extra="forbid")

    prompt: Optional[str] = Field(None, max_length=200_000)
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1, max_length=1000)
    max_tokens: int = Field(100, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0, le=100_000)
    stop: list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]] = Field(default_factory=list,
                                                                         max_length=MAX_STOP_SEQUENCES)
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    model_id: Optional[str] = Field(None, max_length=200)
    request_id: Optional[str] = Field(None, pattern=REQUEST_ID_PATTERN)
    user_wallet: Optional[str] = Field(None, pattern=WALLET_PATTERN)
    stream: bool = True

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.strip():
            raise ValueError("prompt is empty")
        return value

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> "GenerateRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.messages is not None and not any(m.text().strip() for m in self.messages):
            raise ValueError("messages are empty")
        return self

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop sequences must be non-empty strings")
        return value


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
    finish_reason: Literal["length", "stop", "eos", "cancelled"]
    text: str
    usage: Usage
    cost_far: str
    fee_far: str
    contributions: list[Contribution]
    replaced_servers: list[ReplacedServer] = []


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail

"""Wire models and input rules of the discovery API (pure; shapes in docs/discovery.md)."""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.common.http import ApiError  # noqa: F401  (re-exported: the discovery code raises it)
from services.common.http import MAX_SAFE_INTEGER, JsonInt, json_int
from services.common.wallets import WALLET_SCHEMA, wallet_problem

PEER_ID_RE = re.compile(r"^Qm[1-9A-HJ-NP-Za-km-z]{44}$")
PEER_ID_RULE = "must be a base58 libp2p peer ID (Qm..., 46 characters)"
# The rules as the OpenAPI document states them (enforced by check_peer_id/check_wallet/check_node_id, with the
# same patterns, so a schema-valid value is never refused for its format and a schema-invalid one always is).
PEER_ID_SCHEMA = {"type": "string", "pattern": PEER_ID_RE.pattern, "description": "base58 libp2p peer ID"}
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")



# --------------------------------------------------------------------------------------------------------
# Request bodies
# --------------------------------------------------------------------------------------------------------
class Hardware(BaseModel):
    """Exactly these fields (services.common.identity.HARDWARE_FIELDS), bounded; anything else is refused (422):
    whatever is accepted here is stored and published by GET /nodes/active."""

    model_config = ConfigDict(extra="forbid", strict=True)

    gpu: Optional[str] = Field(default=None, max_length=200)
    vram_total_gb: Optional[float] = Field(default=None, ge=0, le=100_000, allow_inf_nan=False)
    ram_total_gb: Optional[float] = Field(default=None, ge=0, le=100_000, allow_inf_nan=False)
    device: Optional[str] = Field(default=None, max_length=100)


class RegisterRequest(BaseModel):
    # strict: no coercion between JSON types ("1" is not 1), as the schema says
    model_config = ConfigDict(extra="ignore", strict=True)

    peer_id: str = Field(json_schema_extra=PEER_ID_SCHEMA)
    wallet_address: str = Field(json_schema_extra=WALLET_SCHEMA)
    model_id: str = Field(min_length=1, max_length=200)
    start_block: JsonInt = Field(ge=0, le=100_000)
    end_block: JsonInt = Field(ge=1, le=100_000)
    public_name: Optional[str] = Field(default=None, max_length=100)
    hardware: Hardware = Field(default_factory=Hardware)
    public_key: str = Field(min_length=1, max_length=8192)
    signature: str = Field(min_length=1, max_length=8192)
    nonce: str = Field(min_length=1, max_length=128)

    @field_validator("peer_id")
    @classmethod
    def _peer_id(cls, value: str) -> str:
        if not PEER_ID_RE.fullmatch(value):
            raise ValueError(PEER_ID_RULE)
        return value

    @field_validator("wallet_address")
    @classmethod
    def _wallet(cls, value: str) -> str:
        problem = wallet_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class HeartbeatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    tokens_served: Optional[json_int(ge=0, le=MAX_SAFE_INTEGER)] = None
    vram_used_gb: Optional[float] = Field(default=None, ge=0, le=100_000)
    gpu_temp_c: Optional[float] = Field(default=None, ge=-100, le=200)
    state: Optional[Literal["joining", "online"]] = None


def check_wallet(wallet: str) -> str:
    problem = wallet_problem(wallet)
    if problem:
        raise ApiError(422, "invalid_wallet", f"wallet {wallet[:64]!r} {problem}")
    return wallet


def check_node_id(node_id: str) -> str:
    """A node ID in its canonical UUID form (uuid.UUID alone would also take braces, urn:uuid:, no hyphens)."""
    if not UUID_RE.fullmatch(node_id):
        raise ApiError(422, "invalid_node_id", f"node_id {node_id[:64]!r} is not a UUID")
    return node_id.lower()


def check_peer_id(peer_id: str) -> str:
    if not PEER_ID_RE.fullmatch(peer_id):
        raise ApiError(422, "invalid_peer_id", f"peer_id {peer_id[:64]!r} {PEER_ID_RULE}")
    return peer_id


# --------------------------------------------------------------------------------------------------------
# Answers (OpenAPI; the service builds them as dicts). Node views carry more fields than listed (extra allowed).
# --------------------------------------------------------------------------------------------------------
class Challenge(BaseModel):
    nonce: str
    expires_in_s: int


class Registered(BaseModel):
    node_id: str
    node_token: str = Field(description="Bearer token of the node's heartbeats and unregister")
    heartbeat_interval_s: float


class HeartbeatAnswer(BaseModel):
    model_config = ConfigDict(extra="allow")

    ok: bool
    node_id: str
    heartbeat_interval_s: float
    tokens_served: int
    earned_far: str
    state: str


class Unregistered(BaseModel):
    ok: bool
    node_id: str
    state: str


class NodeView(BaseModel):
    model_config = ConfigDict(extra="allow")

    node_id: str
    peer_id: str
    wallet_address: str
    model_id: str
    start_block: int
    end_block: int
    blocks: str
    public_name: Optional[str]
    state: str
    active: bool


class ActiveNodes(BaseModel):
    nodes: list[NodeView]
    count: int
    heartbeat_ttl_s: float


class ModelInfo(BaseModel):
    model_id: str
    num_blocks: int


class ModelList(BaseModel):
    models: list[ModelInfo]


class ModelNodes(BaseModel):
    model_id: str
    num_blocks: int
    nodes: list[NodeView]
    count: int


class ProviderStats(BaseModel):
    wallet_address: str
    tokens_served: int
    sessions: int
    earned_far: str
    paid_far: str
    pending_far: str
    nodes_online: int
    nodes_total: int


class ProviderNodes(BaseModel):
    wallet_address: str
    nodes: list[NodeView]
    count: int

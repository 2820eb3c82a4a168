"""Wire models and input rules of the discovery API (pure; shapes in docs/discovery.md)."""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.common.http import ApiError  # noqa: F401  (re-exported: the discovery code raises it)
from services.common.wallets import wallet_problem

PEER_ID_RE = re.compile(r"^Qm[1-9A-HJ-NP-Za-km-z]{44}$")
PEER_ID_RULE = "must be a base58 libp2p peer ID (Qm..., 46 characters)"



# --------------------------------------------------------------------------------------------------------
# Request bodies
# --------------------------------------------------------------------------------------------------------
class Hardware(BaseModel):
    """Exactly these fields (services.common.identity.HARDWARE_FIELDS), bounded; anything else is refused (422):
    whatever is accepted here is stored and published by GET /nodes/active."""

    model_config = ConfigDict(extra="forbid")

    gpu: Optional[str] = Field(default=None, max_length=200)
    vram_total_gb: Optional[float] = Field(default=None, ge=0, le=100_000, allow_inf_nan=False)
    ram_total_gb: Optional[float] = Field(default=None, ge=0, le=100_000, allow_inf_nan=False)
    device: Optional[str] = Field(default=None, max_length=100)


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    peer_id: str
    wallet_address: str
    model_id: str = Field(min_length=1, max_length=200)
    start_block: int = Field(ge=0, le=100_000)
    end_block: int = Field(ge=1, le=100_000)
    public_name: Optional[str] = Field(default=None, max_length=100)
    hardware: Hardware = Field(default_factory=Hardware)
    public_key: str = Field(min_length=1, max_length=8192)
    signature: str = Field(min_length=1, max_length=8192)
    nonce: str = Field(min_length=1, max_length=128)

    @field_validator("peer_id")
    @classmethod
    def _peer_id(cls, value: str) -> str:
        if not PEER_ID_RE.match(value):
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
    model_config = ConfigDict(extra="ignore")

    tokens_served: Optional[int] = Field(default=None, ge=0, le=2**63 - 1)
    vram_used_gb: Optional[float] = Field(default=None, ge=0, le=100_000)
    gpu_temp_c: Optional[float] = Field(default=None, ge=-100, le=200)
    state: Optional[Literal["joining", "online"]] = None


def check_wallet(wallet: str) -> str:
    problem = wallet_problem(wallet)
    if problem:
        raise ApiError(422, "invalid_wallet", f"wallet {wallet[:64]!r} {problem}")
    return wallet


def check_peer_id(peer_id: str) -> str:
    if not PEER_ID_RE.match(peer_id):
        raise ApiError(422, "invalid_peer_id", f"peer_id {peer_id[:64]!r} {PEER_ID_RULE}")
    return peer_id

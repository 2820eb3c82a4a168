"""Schemas of the self-service account API (OpenAPI). Money is a decimal string in FAR."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Optional

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema

from services.common.http import json_int
from services.coordinator.protocol import Contribution

RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def _rfc3339(value) -> datetime:
    # Only what the schema's "date-time" means: pydantic alone would also take "0.5" or "1700000000" (a Unix time).
    if isinstance(value, str) and RFC3339.fullmatch(value):
        try:
            return datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
        except ValueError:
            pass
    raise ValueError("must be an RFC 3339 date-time with its offset, e.g. 2026-01-31T12:00:00Z "
                     "(next_before of the previous page is one)")


Timestamp = Annotated[datetime, PlainValidator(_rfc3339), WithJsonSchema({"type": "string", "format": "date-time"})]


class DepositHow(BaseModel):
    network: str
    chain_id: Optional[int] = Field(None, description="97 testnet, 56 mainnet, null for a local chain")
    contract: str = Field(description="FarDeposit contract: call deposit(account_ref, amount)")
    token: str = Field(description="FAR token: approve(contract, amount) first")
    account_ref: str = Field(description="bytes32 naming this account (its UUID right-aligned)")
    confirmations: int = Field(description="blocks on top before the deposit is credited")
    how: str
    docs: str


class Balance(BaseModel):
    account_id: str
    name: str
    balance_far: str = Field(description="money held, reserved part included")
    reserved_far: str = Field(description="held for running requests")
    available_far: str = Field(description="balance - reserved: what a new request can reserve")
    deposited_far: str
    granted_far: str = Field(description="operator credits and the opening balance")
    refunded_far: str = Field("0", description="charges given back: requests a spot check proved wrong")
    charged_far: str
    deposit: Optional[DepositHow] = Field(None, description="how to top up; null when deposits are not configured")


class LedgerEntry(BaseModel):
    at: str
    kind: str = Field(description="deposit | grant | opening | refund (credits, positive; a "
                      "refund gives back the charge of request_id, proven wrong) | charge (negative)")
    amount_far: str
    balance_after_far: Optional[str] = None
    note: Optional[str] = None
    tx_hash: Optional[str] = None
    log_index: Optional[int] = None
    block_number: Optional[int] = None
    from_address: Optional[str] = None
    request_id: Optional[str] = None
    status: Optional[str] = None
    reserved_far: Optional[str] = Field(None, description="charge: what the request reserved")
    refunded_far: Optional[str] = Field(None, description="charge: the unused reservation released")


class Ledger(BaseModel):
    entries: list[LedgerEntry]
    next_before: Optional[str] = Field(None, description="pass as ?before= for the next page")


class UsageRequest(BaseModel):
    request_id: str
    model_id: str
    status: str
    finish_reason: Optional[str]
    prompt_tokens: int
    completion_tokens: int
    cost_far: Optional[str] = Field(description="null while running")
    reserved_far: str
    created_at: str
    finalized_at: Optional[str]
    refunded_far: Optional[str] = Field(None, description="the charge given back because a spot check proved a "
                                        "server's output wrong (docs/verification.md); null when not refunded")
    refund_reason: Optional[str] = None
    nodes: list[Contribution] = Field(description="the servers that computed it and what each earned")


class UsageDay(BaseModel):
    day: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_far: str


class UsageTotals(BaseModel):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_far: str


class Usage(BaseModel):
    requests: list[UsageRequest]
    next_before: Optional[str]
    daily: list[UsageDay]
    totals: UsageTotals


class ApiKey(BaseModel):
    key_id: str
    name: Optional[str]
    prefix: str
    rate_limit_per_minute: int
    created_at: str
    revoked_at: Optional[str]
    current: bool = Field(description="the key this request was made with")


class NewApiKey(ApiKey):
    key: str = Field(description="the secret: shown once, never stored")


class ApiKeys(BaseModel):
    keys: list[ApiKey]


class CreateKey(BaseModel):
    model_config = ConfigDict(strict=True)

    name: Optional[str] = Field(None, max_length=100)
    rate_limit_per_minute: Optional[json_int(ge=1)] = Field(None, description="at most the calling key's own limit")

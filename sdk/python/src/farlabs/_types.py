"""Response types. Money is a :class:`decimal.Decimal` in FAR (the wire carries decimal strings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, List, Literal, Mapping, Optional, Sequence, TypedDict, Union

FinishReason = Literal["length", "stop", "eos", "cancelled"]


class Message(TypedDict):
    """One chat turn; the coordinator renders the turns with the model's chat template."""

    role: Literal["system", "user", "assistant"]
    content: str


PromptOrMessages = Union[str, Sequence[Mapping[str, Any]]]


def _decimal(value: Any) -> Decimal:
    return Decimal(str(value)) if value is not None else Decimal(0)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Contribution:
    """What one provider node computed for the request, and what it earns for it."""

    node_id: Optional[str]
    peer_id: str
    wallet_address: Optional[str]
    blocks: str
    work_units: int
    payment_far: Decimal

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Contribution":
        return cls(node_id=data.get("node_id"), peer_id=str(data.get("peer_id", "")),
                   wallet_address=data.get("wallet_address"), blocks=str(data.get("blocks", "")),
                   work_units=int(data.get("work_units") or 0), payment_far=_decimal(data.get("payment_far")))


@dataclass(frozen=True)
class TopLogprob:
    """A token (its own text and UTF-8 bytes) and its log-probability."""

    token: str
    logprob: float
    bytes: List[int]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TopLogprob":
        return cls(token=str(data.get("token", "")), logprob=float(data.get("logprob", 0.0)),
                   bytes=list(data.get("bytes") or []))


@dataclass(frozen=True)
class TokenLogprob(TopLogprob):
    """A generated token's log-probability and the most likely tokens at its step (``logprobs=k`` asks for k)."""

    top_logprobs: List[TopLogprob] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TokenLogprob":
        top = TopLogprob.from_json(data)
        return cls(token=top.token, logprob=top.logprob, bytes=top.bytes,
                   top_logprobs=[TopLogprob.from_json(t) for t in data.get("top_logprobs") or []])


def _logprobs(data: Any) -> Optional[List[TokenLogprob]]:
    return None if data is None else [TokenLogprob.from_json(entry) for entry in data]


@dataclass(frozen=True)
class ChatResponse:
    """The result of a generation: the text, what it cost and which nodes computed it."""

    text: str
    request_id: str
    finish_reason: FinishReason
    usage: Usage
    cost_far: Decimal
    fee_far: Decimal
    contributions: List[Contribution] = field(default_factory=list)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    served_by: str = "swarm"  # "fallback": the coordinator's fallback API answered (the swarm was not ready)
    logprobs: Optional[List[TokenLogprob]] = None  # one per generated token, when asked for (``logprobs=k``)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ChatResponse":
        usage = data.get("usage") or {}
        return cls(text=str(data.get("text") or ""), request_id=str(data.get("request_id", "")),
                   finish_reason=data.get("finish_reason", "stop"),
                   usage=Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)),
                   cost_far=_decimal(data.get("cost_far")), fee_far=_decimal(data.get("fee_far")),
                   contributions=[Contribution.from_json(c) for c in data.get("contributions") or []],
                   raw=dict(data), served_by=str(data.get("served_by") or "swarm"),
                   logprobs=_logprobs(data.get("logprobs")))


@dataclass(frozen=True)
class TokenEvent:
    """One streamed step: ``token`` (may be ``""`` while text is held back), the running count and cost."""

    token: str
    request_id: str
    tokens_generated: int
    cost_far: Decimal
    logprobs: Optional[TokenLogprob] = None  # when asked for (``logprobs=k``)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TokenEvent":
        entry = data.get("logprobs")
        return cls(token=str(data.get("token") or ""), request_id=str(data.get("request_id", "")),
                   tokens_generated=int(data.get("tokens_generated") or 0), cost_far=_decimal(data.get("cost_far")),
                   logprobs=None if entry is None else TokenLogprob.from_json(entry))


@dataclass(frozen=True)
class Model:
    id: str
    owned_by: str
    ready: bool
    missing_blocks: List[int]
    loading_blocks: List[int]
    context_length: Optional[int]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Model":
        return cls(id=str(data.get("id", "")), owned_by=str(data.get("owned_by", "")), ready=bool(data.get("ready")),
                   missing_blocks=list(data.get("missing_blocks") or []),
                   loading_blocks=list(data.get("loading_blocks") or []),
                   context_length=data.get("context_length"))


@dataclass(frozen=True)
class InferenceStatus:
    """``GET /mesh/inference/{request_id}``: ``status`` is running, completed, cancelled, failed or interrupted."""

    request_id: str
    status: str
    tokens_generated: int
    finish_reason: Optional[str]
    cost_far: Optional[Decimal]
    route: List[Any]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "InferenceStatus":
        cost = data.get("cost_far")
        return cls(request_id=str(data.get("request_id", "")), status=str(data.get("status", "")),
                   tokens_generated=int(data.get("tokens_generated") or 0), finish_reason=data.get("finish_reason"),
                   cost_far=_decimal(cost) if cost is not None else None, route=list(data.get("route") or []))


@dataclass(frozen=True)
class Balance:
    """``GET /mesh/account``: ``balance_far`` includes ``reserved_far`` (held for running requests);
    ``available_far`` is what a new request can reserve. ``deposit`` says how to top up (contract, ``account_ref``,
    confirmations; None when the coordinator has no deposit contract)."""

    account_id: str
    name: str
    balance_far: Decimal
    reserved_far: Decimal
    available_far: Decimal
    deposited_far: Decimal
    charged_far: Decimal
    deposit: Optional[Mapping[str, Any]] = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Balance":
        return cls(account_id=str(data.get("account_id", "")), name=str(data.get("name", "")),
                   balance_far=_decimal(data.get("balance_far")), reserved_far=_decimal(data.get("reserved_far")),
                   available_far=_decimal(data.get("available_far")),
                   deposited_far=_decimal(data.get("deposited_far")), charged_far=_decimal(data.get("charged_far")),
                   deposit=data.get("deposit"))


@dataclass(frozen=True)
class RequestUsage:
    """One request of ``GET /mesh/account/usage``: tokens, cost (None while running) and the nodes that served it."""

    request_id: str
    model_id: str
    status: str
    prompt_tokens: int
    completion_tokens: int
    cost_far: Optional[Decimal]
    created_at: str
    nodes: List[Mapping[str, Any]] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RequestUsage":
        cost = data.get("cost_far")
        return cls(request_id=str(data.get("request_id", "")), model_id=str(data.get("model_id", "")),
                   status=str(data.get("status", "")), prompt_tokens=int(data.get("prompt_tokens") or 0),
                   completion_tokens=int(data.get("completion_tokens") or 0),
                   cost_far=Decimal(str(cost)) if cost is not None else None,
                   created_at=str(data.get("created_at", "")), nodes=list(data.get("nodes") or []))


@dataclass(frozen=True)
class AccountUsage:
    """``GET /mesh/account/usage``: recent ``requests`` (newest first), ``daily`` sums and ``totals``."""

    requests: List[RequestUsage]
    daily: List[Mapping[str, Any]]
    total_requests: int
    total_cost_far: Decimal
    next_before: Optional[str] = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "AccountUsage":
        totals = data.get("totals") or {}
        return cls(requests=[RequestUsage.from_json(r) for r in data.get("requests") or []],
                   daily=list(data.get("daily") or []), total_requests=int(totals.get("requests") or 0),
                   total_cost_far=_decimal(totals.get("cost_far")), next_before=data.get("next_before"))

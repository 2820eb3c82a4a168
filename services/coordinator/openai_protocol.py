"""OpenAI-compatible request models and the chat template (pure)."""

from __future__ import annotations

from typing import Annotated, Any, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from services.common.http import MAX_SAFE_INTEGER, SSE_EVENT, error_responses, json_int
from services.common.states import FinishReason
from services.coordinator.protocol import (MAX_PROMPT_CHARS, MAX_STOP_CHARS, MAX_STOP_SEQUENCES, MAX_TOKENS_LIMIT,
                                           MAX_TOP_LOGPROBS, NOT_BLANK, SOME_MESSAGE_HAS_TEXT, UNSUPPORTED, ChatMessage,
                                           LogitBias)

# The rules of GenerateRequest (what these requests become), stated in these schemas too.
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS, pattern=NOT_BLANK)]
Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]

# Used when the model's tokenizer has no chat template of its own (documented in docs/generation.md).
DEFAULT_CHAT_TEMPLATE_STOPS = ("<|user|>", "<|system|>")
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound on the completions API's logprobs


# Fields of OpenAI's request bodies that are refused, with the reason the 400 ``unsupported_parameter`` gives. A
# field that is neither declared by a request model nor listed here is refused too, as an unknown parameter.
REFUSED_FIELDS = {
    "audio": "audio output is not generated (text only)",
    "modalities": "text is the only output modality",
    "prediction": "predicted outputs are not implemented",
    "service_tier": "there are no service tiers",
    "store": "completions are not stored for distillation or evals",
    "reasoning_effort": "the models served are not reasoning models",
    "verbosity": "the models served have no verbosity control",
    "web_search_options": "there is no web search",
    "prompt_cache_key": "there is no prompt cache to route by",
    "functions": "the deprecated functions API is not implemented (use tools)",
    "function_call": "the deprecated functions API is not implemented (use tool_choice)",
    "response_format": "structured outputs are not implemented",
    "tools": "tool calling is not implemented",
    "tool_choice": "tool calling is not implemented",
    "parallel_tool_calls": "tool calling is not implemented",
    "suffix": "insertion (a suffix after the completion) is not implemented",
    "echo": "echoing the prompt is not implemented",
    "best_of": "best_of is not implemented (n returns every choice)",
    "include_obfuscation": "stream obfuscation is not implemented",
    "name": "participant names are not rendered by the chat templates",
}
MAX_METADATA_PAIRS = 16  # OpenAI's bounds on metadata
MetadataKey = Annotated[str, Field(max_length=64)]
MetadataValue = Annotated[str, Field(max_length=512)]


def unsupported_message(param: str, field: str, detail: Optional[str] = None) -> str:
    """The message of a 400 ``unsupported_parameter`` for ``param`` (its path, e.g. ``messages[0].name``)."""
    reason = detail or REFUSED_FIELDS.get(field, "it is not a parameter of this endpoint here")
    return f"unsupported parameter {param!r}: {reason} (docs/generation.md lists every field)"


def _one_choice(n: int) -> int:
    if n > 1:
        raise PydanticCustomError(UNSUPPORTED, "n > 1 is not implemented (one choice per request)")
    return n


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class _Common(BaseModel):
    # Unknown fields are refused (400 unsupported_parameter, api/openai_routes.py): a client never believes it
    # got a feature it did not get. No coercion between JSON types (GenerateRequest). A null is an absent field.
    model_config = ConfigDict(extra="forbid", strict=True)

    model: Optional[str] = Field(None, max_length=200)
    max_tokens: Optional[json_int(ge=1, le=MAX_TOKENS_LIMIT)] = None
    max_completion_tokens: Optional[json_int(ge=1, le=MAX_TOKENS_LIMIT)] = None
    # Sampling: absent → the model's recommended setting (docs/generation.md "Defaults per model").
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[json_int(ge=0, le=100_000)] = Field(None, description="an extension (vLLM's): 0 = off")
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=10.0, description="an extension (vLLM's)")
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    logit_bias: LogitBias = None
    n: Optional[Annotated[json_int(ge=1), AfterValidator(_one_choice)]] = Field(
        None, json_schema_extra={"maximum": 1})
    stop: Union[Stop, Annotated[list[Stop], Field(max_length=MAX_STOP_SEQUENCES)], None] = None
    seed: Optional[json_int(ge=0, le=MAX_SAFE_INTEGER)] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    # Accepted; they do not change the answer.
    user: Optional[str] = Field(None, max_length=256)
    safety_identifier: Optional[str] = Field(None, max_length=256)
    metadata: Optional[dict[MetadataKey, MetadataValue]] = Field(None, max_length=MAX_METADATA_PAIRS)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def logprobs_count(self) -> Optional[int]:
        """How many most likely tokens to report per generated token; None: no logprobs."""
        return None


class CompletionRequest(_Common):
    prompt: Union[Prompt, Annotated[list[Prompt], Field(min_length=1, max_length=1)]] = Field(
        description="one prompt (a list of exactly one is accepted too)")
    logprobs: Optional[json_int(ge=0, le=MAX_COMPLETION_LOGPROBS)] = Field(
        None, description="the log-probability of every token and of this many most likely ones (OpenAI: at most 5)")

    def prompt_text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt

    def logprobs_count(self) -> Optional[int]:
        return self.logprobs


# top_logprobs needs logprobs: true (as OpenAI says), stated in the schema too.
_TOP_NEEDS_LOGPROBS = {"if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
                       "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}}


class ChatCompletionRequest(_Common):
    model_config = ConfigDict(json_schema_extra=_TOP_NEEDS_LOGPROBS)

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1000, json_schema_extra=SOME_MESSAGE_HAS_TEXT)
    logprobs: Optional[bool] = Field(None, description="the log-probability of every generated token")
    top_logprobs: Optional[json_int(ge=0, le=MAX_TOP_LOGPROBS)] = Field(
        None, description="and of this many most likely tokens at each step (needs logprobs: true)")

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def logprobs_count(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: str = "model"
    ready: bool = Field(description="the swarm serves every block now")
    fallback: bool = Field(description="a fallback API serves it while the swarm is not ready")
    context_length: int


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class OpenAIResponse(BaseModel):
    """A completion (``text_completion``) or chat completion (``chat.completion``) as OpenAI shapes it, with the
    cost in FAR and who served it."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: str
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: dict[str, int]
    cost_far: str
    served_by: str


OPENAI_RESPONSES = {
    200: {"model": OpenAIResponse, "description": "stream=false: the completion. stream=true: Server-Sent Events "
                                                  "of OpenAI chunks, ending with `data: [DONE]`",
          "content": {"text/event-stream": {"schema": SSE_EVENT}}},
    **error_responses(400, 401, 402, 404, 409, 413, 422, 429, 502, 503, 504),
}


def render_chat(tokenizer, messages: list[ChatMessage]) -> tuple[str, list[str]]:
    """The prompt for ``messages`` and extra stop sequences. The model's own chat template when its tokenizer
    has one; otherwise the default ``<|role|>\\ncontent\\n`` turns ending with ``<|assistant|>\\n`` (and the next
    turn's markers as stop sequences)."""
    plain = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True), []
    turns = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in plain)
    return turns + "<|assistant|>\n", list(DEFAULT_CHAT_TEMPLATE_STOPS)


def openai_finish_reason(finish_reason: str) -> str:
    return "length" if finish_reason == FinishReason.LENGTH else "stop"


def completion_logprobs(entries: list, text_offset: int) -> dict:
    """The completions API's logprobs of ``entries`` (protocol.LogprobEntry), the first token starting at
    ``text_offset`` in the completion's text: ``tokens``, ``token_logprobs``, ``top_logprobs`` ({token: logprob},
    the sampled token included) and ``text_offset``."""
    offsets = []
    for entry in entries:
        offsets.append(text_offset)
        text_offset += len(entry.token)
    return {"tokens": [entry.token for entry in entries],
            "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": [{**{top.token: top.logprob for top in entry.top_logprobs}, entry.token: entry.logprob}
                             for entry in entries],
            "text_offset": offsets}

"""OpenAI-compatible request models and the chat template (pure)."""

from __future__ import annotations

from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from services.common.http import MAX_SAFE_INTEGER, SSE_EVENT, JsonInt, error_responses, json_int
from services.coordinator.protocol import (MAX_PROMPT_CHARS, MAX_STOP_CHARS, MAX_STOP_SEQUENCES, MAX_TOKENS_LIMIT,
                                           NOT_BLANK, SOME_MESSAGE_HAS_TEXT, ChatMessage)

# The rules of GenerateRequest (what these requests become), stated in these schemas too.
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS, pattern=NOT_BLANK)]
Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]

# Used when the model's tokenizer has no chat template of its own (documented in docs/generation.md).
DEFAULT_CHAT_TEMPLATE_STOPS = ("<|user|>", "<|system|>")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # no coercion between JSON types (GenerateRequest)

    model: Optional[str] = Field(None, max_length=200)
    max_tokens: Optional[json_int(ge=1, le=MAX_TOKENS_LIMIT)] = None
    max_completion_tokens: Optional[json_int(ge=1, le=MAX_TOKENS_LIMIT)] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: JsonInt = Field(0, ge=0, le=100_000)
    n: JsonInt = Field(1, ge=1, le=1)
    stop: Union[Stop, Annotated[list[Stop], Field(max_length=MAX_STOP_SEQUENCES)], None] = None
    seed: Optional[json_int(ge=0, le=MAX_SAFE_INTEGER)] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Common):
    prompt: Union[Prompt, Annotated[list[Prompt], Field(min_length=1, max_length=1)]] = Field(
        description="one prompt (a list of exactly one is accepted too)")

    def prompt_text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1000, json_schema_extra=SOME_MESSAGE_HAS_TEXT)


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
    usage: dict[str, Any]  # prompt/completion/total_tokens, prompt_tokens_details.cached_tokens
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
    return "length" if finish_reason == "length" else "stop"

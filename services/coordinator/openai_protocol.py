"""OpenAI-compatible request models and the chat template (pure)."""

from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from services.coordinator.protocol import MAX_TOKENS_LIMIT, ChatMessage

# Used when the model's tokenizer has no chat template of its own (documented in docs/generation.md).
DEFAULT_CHAT_TEMPLATE_STOPS = ("<|user|>", "<|system|>")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Common):
    prompt: Union[str, list[str]]

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ValueError("exactly one prompt per request is supported")
            return self.prompt[0]
        return self.prompt


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)


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

"""Token sampling and incremental detokenization with stop sequences (pure, no network).

``TokenSampler``: temperature / top-k / top-p with a seeded ``torch.Generator`` (same seed → same tokens;
a temperature below ``GREEDY_BELOW_TEMPERATURE`` is greedy). Sampling runs in float64 on logits shifted so their
maximum is 0, so no accepted temperature and no logits (huge, ±inf, NaN) make the probabilities inf or NaN. ``TextStream``: turns token ids into text deltas, holds back text that could still
become a stop sequence (stop sequences are never emitted) and incomplete UTF-8 from byte-fallback pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

# Below this temperature sampling is greedy (argmax): dividing by a tiny temperature overflows, and the
# distribution is a point mass anyway (vLLM uses the same 1e-5).
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 100
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    seed: Optional[int] = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


class TokenSampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def sample(self, logits: torch.Tensor) -> int:
        """``logits``: 1-D tensor over the vocabulary. NaN counts as -inf; if some logits are +inf, the choice is
        among those (uniformly); if all are -inf, token 0 (argmax)."""
        logits = logits.detach().flatten().to(torch.float64)
        negative_inf = torch.tensor(float("-inf"), dtype=torch.float64)
        logits = torch.where(torch.isnan(logits), negative_inf, logits)
        if self.params.greedy:
            return int(torch.argmax(logits))
        positive_inf = torch.isposinf(logits)
        if bool(positive_inf.any()):
            logits = torch.where(positive_inf, torch.zeros_like(logits), negative_inf)
        finite = torch.isfinite(logits)
        if not bool(finite.any()):
            return int(torch.argmax(logits))
        # Shift so the maximum is 0 (exp never overflows, the best token has probability mass >= 1/vocab), then
        # scale; float64 holds float32 logits divided by any temperature >= GREEDY_BELOW_TEMPERATURE.
        logits = (logits - logits[finite].max()) / self.params.temperature
        if self.params.top_k and 0 < self.params.top_k < logits.numel():
            kth = torch.topk(logits, self.params.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if 0 < self.params.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            drop = cumulative - sorted_probs > self.params.top_p  # keep the smallest set reaching top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
            probs = probs / probs.sum()
        return int(torch.multinomial(probs, 1, generator=self.generator))


class TextStream:
    """Incremental detokenizer: ``push(token_id)`` returns the text that is now safe to emit."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.token_ids: list[int] = []
        self.emitted = ""  # text already handed out
        self.stopped = False

    def _full_text(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        text = self._full_text()
        for stop in self.stop:
            index = text.find(stop, max(0, len(self.emitted) - len(stop)))
            if index != -1:
                self.stopped = True
                delta = text[len(self.emitted):index] if index > len(self.emitted) else ""
                self.emitted += delta
                return delta
        safe_end = len(text)
        if text.endswith("\ufffd"):
            safe_end = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence: wait for its next byte
        for stop in self.stop:  # hold back a suffix that is a prefix of a stop sequence
            for size in range(min(len(stop) - 1, safe_end), 0, -1):
                if text[safe_end - size:safe_end] == stop[:size]:
                    safe_end -= size
                    break
        if safe_end <= len(self.emitted):
            return ""
        delta = text[len(self.emitted):safe_end]
        self.emitted += delta
        return delta

    def flush(self) -> str:
        """At the end of generation (not stopped): whatever was held back."""
        if self.stopped:
            return ""
        text = self._full_text()
        delta = text[len(self.emitted):]
        self.emitted += delta
        return delta

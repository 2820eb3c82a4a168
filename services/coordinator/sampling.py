"""Token sampling and incremental detokenization with stop sequences (pure, no network).

``TokenSampler``: temperature / top-k / top-p with a seeded ``torch.Generator`` (same seed → same tokens;
a temperature below ``GREEDY_BELOW_TEMPERATURE`` is greedy). Sampling runs in float64 on logits shifted so their
maximum is 0, so no accepted temperature and no logits (huge, ±inf, NaN) make the probabilities inf or NaN. ``TextStream``: turns token ids into text deltas, holds back text that could still
become a stop sequence (stop sequences are never emitted) and incomplete UTF-8 from byte-fallback pieces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from services.common.states import FinishReason

# Text of this many tokens not released yet (ending in U+FFFD) is split: see TextStream._split.
MAX_UNRELEASED_TOKENS = 8
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")

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
    """Incremental detokenizer: ``push(token_id)`` returns the text that is now safe to emit.

    Linear in the output length: each step decodes a small window of recent tokens (vLLM/TGI-style prefix and
    read offsets: ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])``; the window starts one released
    step back so leading spaces and merges decode as in the full text), never the whole output. The text is
    identical to ``tokenizer.decode(all tokens)``: an incomplete UTF-8 character (decoded as U+FFFD) waits for its
    next token, and a run of byte-fallback tokens (``<0xNN>``, which Hugging Face decoders turn into text only as
    a whole run) or of skipped special tokens is decoded when a token that ends it arrives. Text that could still
    become a stop sequence is held back, so stop sequences are never emitted; the stop search and the hold-back
    only look at the text not yet emitted (at most the longest stop sequence plus one step's text).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.token_ids: list[int] = []
        self.stopped = False
        self.decoded_tokens = 0  # tokens passed to tokenizer.decode so far (a measure of the work)
        self._pieces: list[str] = []  # emitted text
        self._pending = ""  # decoded, not emitted yet (could be the start of a stop sequence)
        self._prefix_offset = 0  # the decode window starts here
        self._read_offset = 0  # the text of the tokens before this is in _pieces + _pending
        self._prefix_text = ""  # decode(token_ids[_prefix_offset:_read_offset])
        self._special_ids = frozenset(getattr(tokenizer, "all_special_ids", None) or ())

    @property
    def emitted(self) -> str:
        """The text handed out so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        if not self._ends_run(token_id):
            return ""  # inside a run of byte or special tokens: its text is known when the run ends
        self._pending += self._advance()
        return self._release(final=False)

    def accept(self, token_id: int, *, count: int, max_tokens: int, end_of_generation: bool
               ) -> tuple[Optional[str], Optional[str]]:
        """One generated token (the ``count``-th): the text to send for it (None: nothing) and the finish reason it
        causes (None: generation goes on). The one rule every engine follows: an end-of-generation token is not
        text (only what was held back is flushed) and finishes ``eos``; a stop sequence finishes ``stop``; the
        ``max_tokens``-th token finishes ``length``, with nothing held back after it."""
        if end_of_generation:
            return self.flush() or None, FinishReason.EOS
        delta = self.push(token_id)
        last = count >= max_tokens
        if last and not self.stopped:
            delta += self.flush()
        if self.stopped:
            return delta, FinishReason.STOP
        return delta, FinishReason.LENGTH if last else None

    def flush(self) -> str:
        """At the end of generation: whatever was held back (a stop sequence in it still stops and is cut)."""
        if self.stopped:
            return ""
        if self._read_offset < len(self.token_ids):
            new_text = self._decode(self.token_ids[self._prefix_offset:])
            self._pending += new_text[len(self._prefix_text):]
            self._prefix_offset = self._read_offset = len(self.token_ids)
            self._prefix_text = ""
        return self._release(final=True)

    # ------------------------------------------------------------------------------------------ internals
    def _decode(self, ids: list[int]) -> str:
        self.decoded_tokens += len(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _ends_run(self, token_id: int) -> bool:
        """False for a byte-fallback token or a special token (skipped when decoding): the text before it can
        still change (a later byte can make a byte run invalid as a whole)."""
        if token_id in self._special_ids:
            return False
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        return not (isinstance(piece, str) and _BYTE_PIECE.fullmatch(piece))

    def _set_offsets(self, prefix: int, read: int) -> None:
        self._prefix_offset, self._read_offset = prefix, read
        self._prefix_text = self._decode(self.token_ids[prefix:read])

    def _advance(self) -> str:
        """The text the new tokens add, once it is final (no trailing incomplete character)."""
        ids = self.token_ids
        new_text = self._decode(ids[self._prefix_offset:])
        if len(new_text) > len(self._prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(self._prefix_text):]
            self._set_offsets(self._read_offset, len(ids))
            return delta
        if len(ids) - self._read_offset > MAX_UNRELEASED_TOKENS:
            return self._split(new_text)
        return ""

    def _split(self, new_text: str) -> str:
        """Many tokens that still end in U+FFFD (invalid bytes): release all but the last 4 tokens (a UTF-8
        character has at most 4 bytes, so their text is final) when that text is a prefix of the window's."""
        ids = self.token_ids
        split = len(ids) - 4
        if split <= self._read_offset or not self._ends_run(ids[split - 1]):
            return ""
        candidate = self._decode(ids[self._prefix_offset:split])
        if len(candidate) < len(self._prefix_text) or not new_text.startswith(candidate):
            return ""
        delta = candidate[len(self._prefix_text):]
        self._set_offsets(self._read_offset, split)
        return delta

    def _release(self, *, final: bool) -> str:
        pending = self._pending
        found = [index for index in (pending.find(stop) for stop in self.stop) if index != -1]
        if found:  # the earliest stop sequence (none can start in the emitted text: see _hold_back)
            self.stopped = True
            delta, self._pending = pending[:min(found)], ""
        else:
            end = len(pending) if final else self._hold_back(pending)
            delta, self._pending = pending[:end], pending[end:]
        if delta:
            self._pieces.append(delta)
        return delta

    def _hold_back(self, pending: str) -> int:
        """Where the longest suffix of ``pending`` that is a proper prefix of a stop sequence starts."""
        end = len(pending)
        for stop in self.stop:
            index = pending.find(stop[0], max(0, len(pending) - len(stop) + 1))
            while index != -1 and index < end:
                if stop.startswith(pending[index:]):
                    end = index
                    break
                index = pending.find(stop[0], index + 1)
        return end

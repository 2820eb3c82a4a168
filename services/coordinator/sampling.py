"""Token sampling and incremental detokenization with stop sequences (pure, no network).

``TokenSampler``: logit bias, repetition / presence / frequency penalties, then temperature / top-k / top-p with a
seeded ``torch.Generator`` (same seed → same tokens; a temperature below ``GREEDY_BELOW_TEMPERATURE`` is greedy),
and on request the log-probabilities of the chosen and the most likely tokens. Sampling runs in float64 on logits
shifted so their maximum is 0, so no accepted temperature and no logits (huge, ±inf, NaN) make the probabilities
inf or NaN. ``TextStream``: turns token ids into text deltas, holds back text that could still become a stop
sequence (stop sequences are never emitted) and incomplete UTF-8 from byte-fallback pieces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import torch

from services.common.states import FinishReason

# Text of this many tokens not released yet (ending in U+FFFD) is split: see TextStream._split.
MAX_UNRELEASED_TOKENS = 8
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# Below this temperature sampling is greedy (argmax): dividing by a tiny temperature overflows, and the
# distribution is a point mass anyway (vLLM uses the same 1e-5).
GREEDY_BELOW_TEMPERATURE = 1e-5
# A log-probability of -inf (a token the model rules out) as OpenAI writes it: JSON has no infinity.
MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of a sampled token and the ``top`` most likely tokens at its step (most likely first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 100
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    seed: Optional[int] = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    grammar: Optional[str] = None  # structured output: an llguidance grammar (services/coordinator/structured.py)
    # OpenAI's: subtracted from a token's logit once it occurred in the output (presence), and per occurrence
    # (frequency); -2..2.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # transformers' / vLLM's: a logit of a token of the prompt or the output is divided by it when positive and
    # multiplied by it when negative (1 = off).
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), -100..100
    logprobs: Optional[int] = None  # None: none; k: the chosen token's log-probability and the k most likely

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)


class TokenConstraint(Protocol):
    """The tokens a stream may produce next (structured.GrammarConstraint), told each token chosen."""

    def allowed_ids(self, vocab_size: int) -> torch.Tensor: ...

    def accept(self, token_id: int) -> None: ...


class TokenSampler:
    """Samples one generation's tokens. ``prompt_ids`` count for the repetition penalty (as in transformers'
    ``RepetitionPenaltyLogitsProcessor``); the presence and frequency penalties count the output only (as OpenAI
    and vLLM do). After each ``sample``, ``last_logprob`` holds the log-probabilities when they were asked for:
    the log-softmax of the model's logits, before bias, penalties, temperature and a constraint (vLLM's raw
    logprobs). With a ``constraint`` (structured outputs), only the tokens it allows are sampled."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int] = (), *,
                 constraint: Optional[TokenConstraint] = None):
        self.params = params
        self.constraint = constraint
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self.output_counts: dict[int, int] = {}
        self.seen: set[int] = set(int(i) for i in prompt_ids) if params.repetition_penalty != 1.0 else set()
        self.last_logprob: Optional[TokenLogprob] = None

    def sample(self, logits: torch.Tensor) -> int:
        """``logits``: 1-D tensor over the vocabulary. NaN counts as -inf; if some logits are +inf, the choice is
        among those (uniformly); if all are -inf, token 0 (argmax). With a constraint, the choice is among the
        tokens it allows only (as if the others' logits were -inf before temperature, top-k and top-p), and the
        constraint is told the token."""
        logits = logits.detach().flatten().to(torch.float64)
        negative_inf = torch.tensor(float("-inf"), dtype=torch.float64)
        logits = torch.where(torch.isnan(logits), negative_inf, logits)
        raw = logits
        if self.params.penalized:
            logits = self._processed(logits)
        if self.constraint is None:
            token_id = self._choose(logits)
        else:  # sampling the allowed ids only: a gather, then a shorter vector, instead of a vocabulary-wide fill
            allowed = self.constraint.allowed_ids(logits.numel())
            token_id = int(allowed[self._choose(logits[allowed])])
            self.constraint.accept(token_id)
        if self.params.logprobs is not None:
            self.last_logprob = token_logprob(raw, token_id, self.params.logprobs)
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1
        if self.params.repetition_penalty != 1.0:
            self.seen.add(token_id)
        return token_id

    def _processed(self, logits: torch.Tensor) -> torch.Tensor:
        """Logit bias, then the repetition penalty, then presence and frequency (vLLM's order)."""
        logits = logits.clone()
        size = logits.numel()
        for token_id, bias in self.params.logit_bias:
            if 0 <= token_id < size:
                logits[token_id] += bias
        penalty = self.params.repetition_penalty
        if penalty != 1.0 and self.seen:
            ids = torch.tensor([i for i in self.seen if 0 <= i < size], dtype=torch.long)
            scores = logits[ids]
            logits[ids] = torch.where(scores < 0, scores * penalty, scores / penalty)
        if (self.params.presence_penalty or self.params.frequency_penalty) and self.output_counts:
            pairs = [(i, c) for i, c in self.output_counts.items() if 0 <= i < size]
            ids = torch.tensor([i for i, _ in pairs], dtype=torch.long)
            counts = torch.tensor([c for _, c in pairs], dtype=torch.float64)
            logits[ids] -= counts * self.params.frequency_penalty + self.params.presence_penalty
        return torch.where(torch.isnan(logits), torch.tensor(float("-inf"), dtype=torch.float64), logits)

    def _choose(self, logits: torch.Tensor) -> int:
        negative_inf = torch.tensor(float("-inf"), dtype=torch.float64)
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


def token_logprob(logits: torch.Tensor, token_id: int, top: int) -> TokenLogprob:
    """The log-softmax of ``logits`` (float64, NaN already -inf) at ``token_id`` and its ``top`` largest values,
    most likely first; -inf (and a distribution without any finite logit) written as ``MIN_LOGPROB``."""
    finite = torch.isfinite(logits)
    if bool(finite.all()):
        logprobs = torch.log_softmax(logits, dim=-1)
    elif bool(torch.isposinf(logits).any()):  # the +inf tokens share all the mass
        inf = torch.isposinf(logits)
        logprobs = torch.where(inf, -torch.log(inf.sum().to(torch.float64)), torch.tensor(float("-inf"),
                                                                                            dtype=torch.float64))
    elif bool(finite.any()):
        logprobs = torch.log_softmax(logits, dim=-1)
    else:
        logprobs = torch.full_like(logits, float("-inf"))

    def clean(value) -> float:
        return max(float(value), MIN_LOGPROB)

    ranked = []
    if top:
        values, ids = torch.topk(logprobs, min(top, logprobs.numel()))
        ranked = [(int(i), clean(v)) for v, i in zip(values.tolist(), ids.tolist())]
    return TokenLogprob(token_id, clean(logprobs[token_id]), tuple(ranked))


# What a request that omits a sampling field gets when neither the model catalog nor the model's generation config
# recommends a value (docs/generation.md "Defaults per model").
GENERIC_SAMPLING_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.0}
_GENERATION_CONFIG_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")


def sampling_defaults(model_id: str, generation_config=None) -> dict:
    """The model's recommended temperature / top_p / top_k / repetition_penalty: its catalog entry's
    (services/models/catalog.py) when it has one, else the values its ``generation_config.json`` sets explicitly,
    each missing value from ``GENERIC_SAMPLING_DEFAULTS``."""
    from services.models.catalog import find_catalog_model

    defaults = dict(GENERIC_SAMPLING_DEFAULTS)
    entry = find_catalog_model(model_id)
    if entry is not None and entry.sampling:
        defaults.update(entry.sampling)
    elif generation_config is not None:
        explicit = generation_config.to_diff_dict() if hasattr(generation_config, "to_diff_dict") else {}
        defaults.update({key: explicit[key] for key in _GENERATION_CONFIG_FIELDS if key in explicit})
    return defaults


class TokenPieces:
    """The text and UTF-8 bytes of single tokens (logprobs name tokens this way), from the vocabulary itself: a
    byte-level BPE piece maps back to its exact bytes, a SentencePiece ``▁`` is a space, a ``<0xNN>`` piece is
    that byte (its text U+FFFD unless the byte is ASCII). Cached per token id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._byte_decoder = _byte_level_decoder(tokenizer)

    def piece(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._piece(token_id)
        return cached

    def _piece(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        piece = piece if isinstance(piece, str) else ""
        if self._byte_decoder is not None and all(char in self._byte_decoder for char in piece):
            raw = bytes(self._byte_decoder[char] for char in piece)
        elif _BYTE_PIECE.fullmatch(piece):
            raw = bytes([int(piece[3:5], 16)])
        else:
            text = piece.replace("\u2581", " ")
            return text, list(text.encode("utf-8"))
        return raw.decode("utf-8", errors="replace"), list(raw)


def _byte_level_decoder(tokenizer) -> Optional[dict[str, int]]:
    """GPT-2's printable-character → byte map when the tokenizer decodes byte-level BPE, else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.decoder).__name__ != "ByteLevel":
        return None
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


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

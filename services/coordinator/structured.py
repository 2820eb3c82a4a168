"""Structured outputs: decoding constrained by a grammar compiled from a JSON schema (llguidance; pure, no network).

``grammar_for_schema`` compiles a JSON schema (``response_format``, a tool's parameters) into an llguidance grammar
and refuses, with the library's words, the schema features it cannot enforce (``UnsupportedSchema``: the API answers
400). ``GrammarConstraint`` is one stream's state: the set of tokens allowed next (a mask the sampler applies to the
logits, services/coordinator/sampling.py) and the tokens accepted so far. It only ever sees the tokens the sampler
chose, so a server failover (which replays positions in the swarm, never re-samples) leaves it exact.

The token table of a tokenizer (every token's bytes) is built once per tokenizer and shared by all streams.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Iterable, Optional

if TYPE_CHECKING:
    import torch

# Compact JSON (no whitespace between tokens): a small model allowed free whitespace can emit it until max_tokens.
JSON_COMPILE_OPTIONS = {"whitespace_flexible": False}
ANY_JSON_OBJECT = {"type": "object"}


class UnsupportedSchema(ValueError):
    """The schema (or grammar) cannot be enforced; the message names the feature, as the library reports it."""


def check_grammar(grammar: str) -> str:
    """``grammar`` if llguidance can enforce it, else ``UnsupportedSchema`` with the library's message."""
    from llguidance import LLMatcher

    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise UnsupportedSchema(error.strip())
    return grammar


def grammar_for_schema(schema: Any) -> str:
    """The llguidance grammar of JSON text valid against ``schema`` (a JSON Schema object)."""
    from llguidance import LLMatcher

    if not isinstance(schema, dict):
        raise UnsupportedSchema("the schema must be a JSON object")
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_COMPILE_OPTIONS)
    except (ValueError, TypeError) as error:
        raise UnsupportedSchema(str(error)) from None
    return check_grammar(grammar)


def grammar_for_response_format(response_format) -> Optional[str]:
    """The grammar of a ``response_format`` (protocol.ResponseFormat): None for ``text``; any JSON object for
    ``json_object``; the schema's for ``json_schema``."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return grammar_for_schema(ANY_JSON_OBJECT)
    schema = response_format.json_schema.schema_
    return grammar_for_schema(ANY_JSON_OBJECT if schema is None else schema)


# ----------------------------------------------------------------------------------------------- token tables
_tables: dict[tuple[int, tuple[int, ...]], tuple[Any, Any]] = {}
_tables_lock = threading.Lock()


def token_table(tokenizer, eos_ids: Iterable[int]):
    """The llguidance token table of a Hugging Face fast tokenizer, with ``eos_ids`` as the tokens that end a
    generation (allowed once the grammar is complete). Built once per (tokenizer, eos ids): ~0.5 s for a
    49k-token vocabulary."""
    import llguidance.hf

    eos = tuple(sorted(int(i) for i in eos_ids))
    key = (id(tokenizer), eos)
    with _tables_lock:
        cached = _tables.get(key)
        if cached is not None and cached[0] is tokenizer:
            return cached[1]
        table = llguidance.hf.from_tokenizer(tokenizer, eos_token=list(eos) or None)
        _tables[key] = (tokenizer, table)  # the tokenizer is held, so its id is never reused for another
        return table


class GrammarConstraint:
    """One stream's grammar state (``sampling.TokenConstraint``). The matcher is built on first use, in the
    generation's thread (building the token table and the grammar can take a fraction of a second)."""

    def __init__(self, tokenizer, grammar: str, eos_ids: Iterable[int]):
        self.tokenizer = tokenizer
        self.grammar = grammar
        self.eos_ids = tuple(eos_ids)
        self._matcher = None
        self._words = None  # the bitmask (numpy int32 words), allocated with the matcher

    def _ready(self):
        if self._matcher is None:
            import numpy as np
            from llguidance import LLMatcher

            table = token_table(self.tokenizer, self.eos_ids)
            matcher = LLMatcher(table, self.grammar, log_level=0)
            self._raise_on_error(matcher)
            self._matcher = matcher
            self._words = np.zeros((table.vocab_size + 31) // 32, dtype=np.int32)
        return self._matcher

    @staticmethod
    def _raise_on_error(matcher) -> None:
        if matcher.is_error():
            raise RuntimeError(f"structured output: {matcher.get_error()}")

    def allowed_ids(self, vocab_size: int) -> "torch.Tensor":
        """The ids the grammar allows next, ascending (never one past the tokenizer's vocabulary, such as a padding
        row of the LM head): a ``[n]`` int64 tensor, never empty (a complete output allows the end tokens)."""
        import numpy as np
        import torch

        matcher = self._ready()
        words = self._words
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        self._raise_on_error(matcher)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab_size]
        ids = np.flatnonzero(bits)
        if ids.size == 0:
            raise RuntimeError("structured output: the grammar allows no token")
        return torch.from_numpy(ids)

    def accept(self, token_id: int) -> None:
        matcher = self._ready()
        if not matcher.consume_token(token_id):
            self._raise_on_error(matcher)
            raise RuntimeError(f"structured output: token {token_id} refused by the grammar")

    @property
    def complete(self) -> bool:
        """The text so far is a whole valid output (an end-of-generation token is allowed)."""
        return self._matcher is not None and self._matcher.is_accepting()


def constraint_for(tokenizer, grammar: Optional[str], eos_ids: Iterable[int]) -> Optional[GrammarConstraint]:
    """The constraint of a generation whose ``SamplingParams.grammar`` is ``grammar`` (None: unconstrained)."""
    return None if grammar is None else GrammarConstraint(tokenizer, grammar, eos_ids)

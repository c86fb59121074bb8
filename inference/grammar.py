"""Constrained decoding: grammars a sequence's output must match, applied as token masks.

The engine is llguidance (Rust, no dependencies; vLLM's "guidance" backend and llama.cpp use
it): an Earley parser over a lexer it builds lazily, so compiling a JSON schema takes a few
milliseconds and a mask tens of microseconds (bench/grammar.py). It reads the vocabulary from
the HF tokenizer's own `tokenizer.json` (the Rust `tokenizers` library), so byte-level and
added tokens are exactly what the model emits.

- `Grammar`: what an output must match (a JSON schema, any JSON object, or a Lark grammar
  that may embed JSON schemas), carried in `SamplingParams.grammar`.
- `GrammarCompiler`: one per engine; holds the token trie and a cache of compiled grammars.
- `GrammarMatcher`: one per constrained sequence; fills its row of the token mask and
  advances with every sampled token.
- `masked_rows`: the sampler's entry point, touching only the constrained rows."""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np
import torch

from .errors import InvalidParameter

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

log = logging.getLogger(__name__)

# Whitespace a JSON grammar allows between tokens: JSON's four characters, at most this many in
# a row. Unbounded whitespace lets a small model fill max_tokens with newlines (why vLLM grew
# "disable-any-whitespace"); 16 still fits pretty-printed JSON a few levels deep.
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,16}"
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_pattern": JSON_WHITESPACE}
_CACHE_SIZE = 64  # compiled grammars kept (tool sets and schemas repeat across requests)
_MAX_ERROR_CHARS = 400


def _limits() -> llguidance.LLParserLimits:
    # No parser state in error messages: they go back to the client as-is.
    return llguidance.LLParserLimits(verbose_errors=False)


@dataclass(frozen=True, slots=True)
class Grammar:
    """What a constrained sequence's output must match: llguidance grammar text (its JSON
    form). `param` names the request field it came from, so that an invalid grammar is
    reported against that field. Build one with `json_schema`, `json_object` or `lark`."""

    text: str
    param: str = "response_format"

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool, param: str = "response_format") -> Grammar:
        """Any JSON value valid under `schema` (draft 2020-12 as OpenAI and pydantic write it)."""
        if schema is True:
            schema = {}  # any JSON value
        if not isinstance(schema, dict):
            raise InvalidParameter(param, "a JSON schema must be an object (or true); false admits no value")
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_OPTIONS)
        except ValueError as e:
            raise InvalidParameter(param, f"invalid JSON schema: {_clean(str(e))}") from None
        return cls(text, param)

    @classmethod
    def json_object(cls, param: str = "response_format") -> Grammar:
        """Any JSON object (OpenAI's `json_object` mode)."""
        return cls.json_schema({"type": "object"}, param)

    @classmethod
    def lark(cls, source: str, param: str = "tools") -> Grammar:
        """A Lark grammar in llguidance's dialect; `%json {...}` embeds a JSON schema (use
        `lark_json` to write one with this module's whitespace rule)."""
        return cls(llguidance.LLMatcher.grammar_from_lark(source), param)


def lark_json(schema: dict[str, Any] | bool) -> str:
    """A Lark `%json` rule body for `schema`, with the same whitespace rule as `Grammar.json_schema`."""
    if schema is True:
        schema = {}
    if isinstance(schema, dict):
        schema = {**schema, "x-guidance": {**_JSON_OPTIONS, **schema.get("x-guidance", {})}}
    return "%json " + json.dumps(schema)


def _clean(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= _MAX_ERROR_CHARS else message[: _MAX_ERROR_CHARS - 1] + "…"


class GrammarCompiler:
    """Compiles grammars for one tokenizer and LM-head width.

    Thread-safe: the HTTP layer checks grammars in worker threads while the model thread
    starts matchers. Invariants: the token trie is built once, on first use (~1 s), under
    `_lock`; `_cache` holds at most `_CACHE_SIZE` matchers in their start state, which are
    only ever deep-copied, never advanced."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Iterable[int]):
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()

    def _token_trie(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                # Every end-of-sequence id the engine stops on is allowed where the grammar accepts.
                eos = self.eos_ids or None
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, self.vocab_size, eos_token=eos)
            return self._tokenizer

    def _start_state(self, grammar: Grammar) -> llguidance.LLMatcher:
        with self._lock:
            hit = self._cache.get(grammar.text)
            if hit is not None:
                self._cache.move_to_end(grammar.text)
                return hit
        matcher = llguidance.LLMatcher(self._token_trie(), grammar.text, log_level=0, limits=_limits())
        if matcher.is_error():
            raise InvalidParameter(grammar.param, f"invalid grammar: {_clean(matcher.get_error())}")
        with self._lock:
            self._cache[grammar.text] = matcher
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher

    def check(self, grammar: Grammar) -> None:
        """InvalidParameter (naming `grammar.param`) unless the grammar compiles. Blocking
        (the first call builds the token trie): call it off the event loop."""
        self._start_state(grammar)

    def matcher(self, grammar: Grammar) -> GrammarMatcher:
        """A fresh matcher at the start of `grammar` (compiled once, then copied)."""
        return GrammarMatcher(self._start_state(grammar).deep_copy(), self.eos_ids)


class GrammarMatcher:
    """One sequence's position in its grammar.

    Invariants: it has consumed exactly the tokens the sequence has sampled so far (the
    sampler's state calls `accept` once per token); the mask it fills allows only tokens that
    keep the output a prefix of a sentence of the grammar, plus end-of-sequence exactly where
    the grammar accepts. A matcher in an error state (a parser limit hit) allows only
    end-of-sequence, so the sequence ends instead of running on unconstrained."""

    __slots__ = ("_m", "_eos")

    def __init__(self, matcher: llguidance.LLMatcher, eos_ids: list[int]):
        self._m = matcher
        self._eos = eos_ids

    def fill_mask(self, row: torch.Tensor) -> None:
        """Write the allowed-token bitmask (int32 words, bit i of word j = token 32j+i) into
        `row`, a contiguous int32 CPU tensor."""
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        if self._m.is_error():
            log.warning("grammar matcher failed: %s", _clean(self._m.get_error()))
            row.zero_()
            as_bytes = row.view(torch.uint8)  # little-endian: token t is bit t % 8 of byte t // 8
            for t in self._eos:
                as_bytes[t // 8] |= 1 << (t % 8)

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar did not allow it."""
        return self._m.consume_token(token_id)

    @property
    def done(self) -> bool:
        """Nothing but end-of-sequence can follow (the output is complete), or it failed."""
        return self._m.is_stopped() or self._m.is_error()

    @property
    def accepting(self) -> bool:
        return self._m.is_accepting()


def masked_rows(logits: torch.Tensor, rows: list[int], matchers: list[GrammarMatcher]) -> torch.Tensor:
    """Rows `rows` of `logits` ([len(rows), V], a new tensor) with the tokens each matcher
    forbids set to -inf (`matchers[i]` constrains `rows[i]`). The input is never modified,
    and no other row is copied: only constrained rows pay."""
    vocab = logits.shape[-1]
    words = torch.empty((len(rows), (vocab + 31) // 32), dtype=torch.int32)
    for row, m in zip(words, matchers):
        m.fill_mask(row)
    # numpy unpacks the bits single-threaded in microseconds (little-endian: bit i of byte k
    # is token 8k + i, the order llguidance writes).
    bits = np.unpackbits(words.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    forbidden = torch.from_numpy(bits == 0).to(logits.device)
    idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
    return logits.index_select(0, idx).masked_fill_(forbidden, float("-inf"))

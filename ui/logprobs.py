"""Sampler logprobs -> OpenAI's two logprobs shapes (chat `content[]`, legacy completions).

The hard part is naming a token: OpenAI reports each token's text and its exact UTF-8
bytes, and a token can hold half of a multi-byte character."""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any

from inference.sampler import SampleOutput

from .schemas import CompletionLogprobs, TokenLogprob, TopLogprob

# JSON has no -inf; vLLM clamps to the same floor.
_FLOOR = -9999.0
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable stand-in character -> raw byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _is_byte_level(tokenizer: Any) -> bool:
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return type(decoder).__name__ == "ByteLevel"


class TokenTexts:
    """token id -> (text, UTF-8 bytes) as OpenAI's logprobs show them.

    Byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM2) spell each token with one
    printable stand-in character per byte; undoing that map gives the exact bytes even for
    a token holding part of a character (its text then shows U+FFFD). Other tokenizers
    decode the token alone, with SentencePiece byte tokens `<0xNN>` mapped to their byte.
    Invariant: the cache only grows up to the vocabulary size."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._byte_level = _is_byte_level(tokenizer)
        self._special = set(getattr(tokenizer, "all_special_ids", ()))
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._compute(token_id)
        return hit

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            piece = ""
        if token_id in self._special:
            return piece, list(piece.encode())
        if self._byte_level:
            table = _byte_decoder()
            if all(c in table for c in piece):
                raw = bytes(table[c] for c in piece)
                return raw.decode("utf-8", errors="replace"), list(raw)
        if m := _BYTE_TOKEN.match(piece):
            raw = bytes([int(m.group(1), 16)])
            return raw.decode("utf-8", errors="replace"), list(raw)
        text = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return text, list(text.encode())


def _clamp(v: float | None) -> float:
    return _FLOOR if v is None or math.isnan(v) else max(v, _FLOOR)


def chat_logprobs(samples: list[SampleOutput], texts: TokenTexts) -> list[TokenLogprob]:
    out = []
    for s in samples:
        token, raw = texts.get(s.token_id)
        top = []
        for alt in s.top_logprobs or []:
            t, b = texts.get(alt.token_id)
            top.append(TopLogprob(token=t, logprob=_clamp(alt.logprob), bytes=b))
        out.append(TokenLogprob(token=token, logprob=_clamp(s.logprob), bytes=raw, top_logprobs=top))
    return out


def completion_logprobs(samples: list[SampleOutput], texts: TokenTexts, offset: int) -> CompletionLogprobs:
    """Legacy shape; `offset` is the text offset of the first token (a stream continues it)."""
    tokens, lps, tops, offsets = [], [], [], []
    for s in samples:
        token = texts.get(s.token_id)[0]
        tokens.append(token)
        lps.append(_clamp(s.logprob))
        tops.append({texts.get(a.token_id)[0]: _clamp(a.logprob) for a in s.top_logprobs or []})
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)


def prompt_logprobs(
    token_ids: list[int], scores: list[SampleOutput] | None, texts: TokenTexts, offset: int = 0
) -> CompletionLogprobs:
    """An echoed prompt in the legacy shape, as OpenAI and vLLM give it: the first token has
    no logprob (nothing before it to score it against); `scores` holds the others' (None:
    the prompt was not scored, every logprob is null)."""
    tokens, lps, tops, offsets = [], [], [], []
    scored: list[SampleOutput | None] = [None, *(scores or [])]
    scored += [None] * (len(token_ids) - len(scored))
    for tok, s in zip(token_ids, scored):
        text = texts.get(tok)[0]
        tokens.append(text)
        lps.append(None if s is None else _clamp(s.logprob))
        tops.append(None if s is None else {texts.get(a.token_id)[0]: _clamp(a.logprob) for a in s.top_logprobs or []})
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)


def next_offset(lp: CompletionLogprobs, offset: int) -> int:
    """The text offset after `lp`'s tokens (`offset` if it has none)."""
    return lp.text_offset[-1] + len(lp.tokens[-1]) if lp.tokens else offset


def join_logprobs(parts: list[CompletionLogprobs]) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=[t for p in parts for t in p.tokens],
        token_logprobs=[v for p in parts for v in p.token_logprobs],
        top_logprobs=[v for p in parts for v in p.top_logprobs],
        text_offset=[v for p in parts for v in p.text_offset],
    )

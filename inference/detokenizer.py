"""Token ids -> streamed text: incremental detokenizing, stop strings, chat templates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import InvalidParameter

try:  # transformers renders chat templates with jinja2
    from jinja2 import TemplateError
except ImportError:  # pragma: no cover - jinja2 ships with transformers' chat support
    TemplateError = ValueError  # type: ignore[misc,assignment]

# How many prompt tokens seed the decode window: enough context for tokenizers whose
# decode() adds or strips a leading space depending on what precedes a token (vLLM uses 5).
_PREFIX_WINDOW = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Streams the text of generated tokens, one delta per `add`.

    Each step decodes only a short window: tokens[prefix_offset:read_offset] (text already
    emitted, kept as context) and tokens[prefix_offset:] (the same plus the new tokens); the
    delta is the difference. Invariants: `prefix_offset <= read_offset <= len(tokens)`; the
    text of tokens[:read_offset] has been emitted; a delta is held back while the window's
    decode ends in U+FFFD, i.e. while a multi-byte character is still incomplete. Special
    tokens are skipped.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int]):
        self._tokenizer = tokenizer
        self._tokens: list[int] = list(prompt_token_ids[-_PREFIX_WINDOW:])
        self._read_offset = len(self._tokens)
        self._prefix_offset = 0
        self._chunks: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        # No clean-up: it rewrites spaces around punctuation differently for different windows.
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes ('' if none yet)."""
        self._tokens.append(token_id)
        prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._tokens[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            # A special token (decodes to nothing) or an incomplete UTF-8 sequence: wait.
            return ""
        delta = new_text[len(prefix_text) :]
        # Only a window is needed from here on; drop older tokens so memory stays bounded.
        del self._tokens[: self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self._chunks.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""


class StopChecker:
    """Cuts streamed text at the first stop string, never emitting any part of it.

    Invariants: `_held` is the longest tail of the text seen so far that is a proper prefix of
    some stop string (so a stop spanning several deltas is still found); everything before it
    has been returned by `feed`. After a stop is hit, `feed` returns ('', True).
    """

    def __init__(self, stop: list[str]):
        self._stops = [s for s in stop if s]
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text, if any

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        if not self._stops:
            return delta, False
        buf = self._held + delta
        hits = [(i, s) for s in self._stops if (i := buf.find(s)) >= 0]
        if hits:
            # The earliest occurrence wins, whichever stop string it is.
            at, self.matched = min(hits, key=lambda h: h[0])
            self.stopped, self._held = True, ""
            return buf[:at], True
        keep = self._partial_tail(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def _partial_tail(self, buf: str) -> int:
        longest = min(len(buf), max(len(s) for s in self._stops) - 1)
        for n in range(longest, 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0

    def flush(self) -> str:
        """At the end of generation: the held-back tail ('' once a stop was hit)."""
        out, self._held = self._held, ""
        return "" if self.stopped else out


def apply_chat_template(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Render `messages` (and `tools`, OpenAI's function definitions, for templates that
    take them) with the tokenizer's chat template and return the token ids."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidParameter(
            "messages",
            "this model's tokenizer has no chat template; use /v1/completions with a plain prompt",
        )
    try:
        out = tokenizer.apply_chat_template(
            messages, tools=tools or None, add_generation_prompt=add_generation_prompt, tokenize=True
        )
    except (TemplateError, ValueError, TypeError, KeyError) as e:
        # The template rejecting the messages (a bad role, a missing field) is a user error.
        raise InvalidParameter("messages", f"chat template failed: {e}") from e
    # transformers 5 returns a BatchEncoding (a Mapping) here; 4.x returned a plain list.
    if isinstance(out, Mapping):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):  # a batch of one
        out = out[0]
    return [int(t) for t in out]

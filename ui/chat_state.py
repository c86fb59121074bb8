"""The chat's state, apart from Gradio: a browser session's exchanges, the prompt sent to the
model (`to_messages`) and what the page shows (`render`), and the parameter defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from inference.errors import InvalidParameter

from .chat_images import shown, user_content

LOADING = "⏳ model loading… send your message again in a few seconds."
# A browser can send a lone UTF-16 surrogate (half of an emoji, pasted or cut); it is no
# character, and a chat history holding one could not be sent back to the page.
NOT_UNICODE = "contains an invalid character (a lone UTF-16 surrogate, half of an emoji?); remove it and send again"


def is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(slots=True)
class GenDefaults:
    """Starting values of the parameter controls."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0  # 0 = off
    max_tokens: int = 512
    seed: int = -1  # -1 = random
    repetition_penalty: float = 1.0


def model_defaults(gen: dict) -> GenDefaults:
    """The model's own sampling defaults (its generation_config.json, as a dict), else ours."""
    d = GenDefaults()
    if gen.get("do_sample") is False:  # HF's greedy flag wins over any temperature it lists
        d.temperature = 0.0
    elif isinstance(gen.get("temperature"), (int, float)):
        d.temperature = float(gen["temperature"])
    for key, attr, kind in (
        ("top_p", "top_p", float),
        ("top_k", "top_k", int),
        ("repetition_penalty", "repetition_penalty", float),
        ("max_new_tokens", "max_tokens", int),
    ):
        if isinstance(gen.get(key), (int, float)):
            setattr(d, attr, kind(gen[key]))
    return d


@dataclass(slots=True)
class Exchange:
    """One user message and the assistant's reply with its generation figures."""

    user: str
    images: list[str] = field(default_factory=list)  # uploaded pictures (paths), shown above the text
    reply: str = ""
    error: str | None = None
    tokens: int = 0
    cached_tokens: int = 0  # prompt tokens (the history) whose KV the prefix cache held
    ttft_s: float | None = None
    tok_s: float | None = None
    finish: str | None = None  # engine finish reason; "stopped" when the user pressed Stop
    done: bool = False

    def meta(self) -> str:
        if self.error is not None or not self.done:
            return ""  # figures appear once the reply is complete (or stopped)
        parts = [f"{self.tokens} tokens"]
        if self.ttft_s is not None:
            parts.append(f"first token {self.ttft_s:.2f} s")
        if self.cached_tokens:
            parts.append(f"{self.cached_tokens} tokens from cache")
        if self.tok_s is not None:
            parts.append(f"{self.tok_s:.1f} tok/s")
        if self.finish == "length":
            parts.append("hit max tokens")
        elif self.finish == "stopped":
            parts.append("stopped")
        return " · ".join(parts)


@dataclass(slots=True)
class ChatState:
    """A browser session's conversation. Invariant: only the last exchange may be
    unfinished, and `busy` is True exactly while a generation for it is running."""

    exchanges: list[Exchange] = field(default_factory=list)
    busy: bool = False

    def pending(self) -> Exchange | None:
        ex = self.exchanges[-1] if self.exchanges else None
        return ex if ex is not None and not ex.done else None


def to_messages(system: str, exchanges: list[Exchange]) -> list[dict]:
    """The prompt: system prompt, then the finished turns that did not fail, then the
    pending user message. Failed turns are dropped so the model never sees our errors."""
    msgs = [{"role": "system", "content": system.strip()}] if system.strip() else []
    for ex in exchanges:
        if ex.error is not None:
            continue
        msgs.append({"role": "user", "content": user_content(ex.user, ex.images)})
        if ex.done:
            msgs.append({"role": "assistant", "content": ex.reply})
    return msgs


def render(state: ChatState) -> list[dict]:
    """gr.Chatbot messages; the figures line is display only (never sent to the model)."""
    out: list[dict] = []
    for ex in state.exchanges:
        out.append({"role": "user", "content": shown(ex.user, ex.images)})
        if ex.error is not None:
            # Keep what streamed before a failure (e.g. a lost pipeline stage) above the error.
            body = ex.error if ex.error == LOADING else (ex.reply + "\n\n" if ex.reply else "") + f"⚠️ {ex.error}"
        elif ex.reply or ex.done:
            body = ex.reply or "_(empty reply)_"
            if meta := ex.meta():
                body += f'\n\n<span class="msg-meta">{meta}</span>'
        else:
            body = "…"  # shown until the first token arrives
        out.append({"role": "assistant", "content": body})
    return out


def describe(e: Exception) -> str:
    """One line for the chat; a prompt over the context gets the way out added."""
    text = str(e) or type(e).__name__
    if isinstance(e, InvalidParameter) and e.param in ("messages", "prompt"):
        text += " — press Clear to start a new conversation"
    return text

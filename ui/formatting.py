"""Engine outputs -> OpenAI response objects: whole responses and server-sent-event chunks.

One formatter per route. A streaming formatter is fed outputs in arrival order (choices
interleave) and returns the SSE lines to send; a whole response is built from the outputs
collected per choice."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pydantic import BaseModel

from inference.engine import RequestOutput
from inference.sampler import SampleOutput

from .logprobs import TokenTexts, chat_logprobs, completion_logprobs
from .schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    Usage,
)

DONE = b"data: [DONE]\n\n"


def sse(obj: BaseModel | dict) -> bytes:
    data = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n".encode()


@dataclass(slots=True)
class ChoiceResult:
    """Everything one choice produced, accumulated from its outputs."""

    text: list[str] = field(default_factory=list)
    num_output_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[SampleOutput] = field(default_factory=list)

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.text)
        self.num_output_tokens = out.num_output_tokens
        self.logprobs += out.logprobs
        if out.finished:
            self.finish_reason = out.finish_reason


@dataclass(slots=True)
class Meta:
    id: str
    created: int
    model: str
    num_choices: int
    prompt_tokens: int  # the templated prompt(s), counted once per prompt (not per choice)
    logprobs: bool  # whether the request asked for logprobs
    include_usage: bool = False  # streams only: a last chunk with `usage` and no choices


class _Formatter:
    def __init__(self, meta: Meta, texts: TokenTexts):
        self.meta = meta
        self.texts = texts
        self._completion_tokens = [0] * meta.num_choices

    def usage(self, completion_tokens: int | None = None) -> Usage:
        done = sum(self._completion_tokens) if completion_tokens is None else completion_tokens
        return Usage(
            prompt_tokens=self.meta.prompt_tokens, completion_tokens=done, total_tokens=self.meta.prompt_tokens + done
        )

    def _track(self, index: int, out: RequestOutput) -> None:
        self._completion_tokens[index] = out.num_output_tokens


class ChatFormatter(_Formatter):
    def _chunk(self, choice: ChatChunkChoice | None, usage: Usage | None = None) -> bytes:
        m = self.meta
        return sse(
            ChatCompletionChunk(
                id=m.id, created=m.created, model=m.model, choices=[choice] if choice else [], usage=usage
            )
        )

    def start(self) -> list[bytes]:
        # OpenAI opens every choice with a chunk that carries only the role.
        return [
            self._chunk(ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")))
            for i in range(self.meta.num_choices)
        ]

    def output(self, index: int, out: RequestOutput) -> list[bytes]:
        self._track(index, out)
        lines = []
        if out.text or (self.meta.logprobs and out.logprobs):
            lp = ChatLogprobs(content=chat_logprobs(out.logprobs, self.texts)) if self.meta.logprobs else None
            lines.append(self._chunk(ChatChunkChoice(index=index, delta=ChatDelta(content=out.text), logprobs=lp)))
        if out.finished:
            lines.append(self._chunk(ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=out.finish_reason)))
        return lines

    def end(self) -> list[bytes]:
        return [self._chunk(None, self.usage())] if self.meta.include_usage else []

    def response(self, results: list[ChoiceResult]) -> ChatCompletion:
        m = self.meta
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content="".join(r.text)),
                finish_reason=r.finish_reason,
                logprobs=ChatLogprobs(content=chat_logprobs(r.logprobs, self.texts)) if m.logprobs else None,
            )
            for i, r in enumerate(results)
        ]
        return ChatCompletion(
            id=m.id,
            created=m.created,
            model=m.model,
            choices=choices,
            usage=self.usage(sum(r.num_output_tokens for r in results)),
        )


class CompletionFormatter(_Formatter):
    def __init__(self, meta: Meta, texts: TokenTexts):
        super().__init__(meta, texts)
        self._offsets = [0] * meta.num_choices  # text offset of each choice's next token

    def _chunk(self, choice: CompletionChoice | None, usage: Usage | None = None) -> bytes:
        m = self.meta
        return sse(
            Completion(id=m.id, created=m.created, model=m.model, choices=[choice] if choice else [], usage=usage)
        )

    def _logprobs(self, index: int, samples: list[SampleOutput]):
        if not self.meta.logprobs:
            return None
        lp = completion_logprobs(samples, self.texts, self._offsets[index])
        if lp.tokens:
            self._offsets[index] = lp.text_offset[-1] + len(lp.tokens[-1])
        return lp

    def start(self) -> list[bytes]:
        return []

    def output(self, index: int, out: RequestOutput) -> list[bytes]:
        self._track(index, out)
        lines = []
        if out.text or (self.meta.logprobs and out.logprobs):
            lines.append(
                self._chunk(CompletionChoice(index=index, text=out.text, logprobs=self._logprobs(index, out.logprobs)))
            )
        if out.finished:
            lines.append(self._chunk(CompletionChoice(index=index, text="", finish_reason=out.finish_reason)))
        return lines

    def end(self) -> list[bytes]:
        return [self._chunk(None, self.usage())] if self.meta.include_usage else []

    def response(self, results: list[ChoiceResult]) -> Completion:
        m = self.meta
        choices = [
            CompletionChoice(
                index=i, text="".join(r.text), finish_reason=r.finish_reason, logprobs=self._logprobs(i, r.logprobs)
            )
            for i, r in enumerate(results)
        ]
        return Completion(
            id=m.id,
            created=m.created,
            model=m.model,
            choices=choices,
            usage=self.usage(sum(r.num_output_tokens for r in results)),
        )


Formatter = ChatFormatter | CompletionFormatter

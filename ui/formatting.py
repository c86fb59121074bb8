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

from .logprobs import (
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
    join_logprobs,
    next_offset,
    prompt_logprobs,
)
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
    CompletionLogprobs,
    PromptTokensDetails,
    Usage,
)
from .tool_calls import ToolPlan, finish_reason
from .tool_parsers import ContentDelta, ToolCallStart, ToolEvent
from .tool_schemas import FunctionCallDelta, FunctionCallOut, ToolCallDelta, ToolCallOut

DONE = b"data: [DONE]\n\n"


def sse(obj: BaseModel | dict) -> bytes:
    data = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n".encode()


@dataclass(slots=True)
class ChoiceResult:
    """Everything one choice produced, accumulated from its outputs."""

    text: list[str] = field(default_factory=list)
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[SampleOutput] = field(default_factory=list)
    prompt_logprobs: list[SampleOutput] | None = None  # the prompt scored (echo with logprobs)

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.text)
        self.num_output_tokens = out.num_output_tokens
        self.num_cached_tokens = out.num_cached_tokens
        self.logprobs += out.logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            self.finish_reason = out.finish_reason


@dataclass(slots=True)
class Meta:
    id: str
    created: int
    model: str
    num_choices: int
    prompt_tokens: int  # the templated prompt(s), counted once per prompt (not per choice)
    choices_per_prompt: int  # `n`: choice i answers prompt i // n
    logprobs: bool  # whether the request asked for logprobs
    include_usage: bool = False  # streams only: a last chunk with `usage` and no choices
    continuous_usage: bool = False  # streams only: every chunk carries the usage so far


class _Formatter:
    def __init__(self, meta: Meta, texts: TokenTexts):
        self.meta = meta
        self.texts = texts
        self._completion_tokens = [0] * meta.num_choices
        self._cached_tokens = [0] * meta.num_choices

    def usage(self, completion_tokens: int | None = None, cached: list[int] | None = None) -> Usage:
        done = sum(self._completion_tokens) if completion_tokens is None else completion_tokens
        # A prompt counts once: it was computed unless every one of its choices found it cached
        # (the first choice computes it, its siblings reuse that).
        cached, n = cached or self._cached_tokens, self.meta.choices_per_prompt
        from_cache = sum(min(cached[i : i + n]) for i in range(0, len(cached), n))
        return Usage(
            prompt_tokens=self.meta.prompt_tokens,
            completion_tokens=done,
            total_tokens=self.meta.prompt_tokens + done,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=from_cache),
        )

    def _track(self, index: int, out: RequestOutput) -> None:
        self._completion_tokens[index] = out.num_output_tokens
        self._cached_tokens[index] = out.num_cached_tokens

    def _usage_so_far(self, usage: Usage | None) -> Usage | None:
        return self.usage() if usage is None and self.meta.continuous_usage else usage


def _tool_delta(event: ToolEvent) -> ChatDelta:
    if isinstance(event, ContentDelta):
        return ChatDelta(content=event.text)
    if isinstance(event, ToolCallStart):
        call = ToolCallDelta(
            index=event.index, id=event.id, type="function", function=FunctionCallDelta(name=event.name, arguments="")
        )
    else:
        call = ToolCallDelta(index=event.index, function=FunctionCallDelta(arguments=event.text))
    return ChatDelta(tool_calls=[call])


class ChatFormatter(_Formatter):
    """With `tools` (the request may get tool calls back), each choice's text goes through
    its own tool-call parser: content and calls come out separately, streamed as deltas."""

    def __init__(self, meta: Meta, texts: TokenTexts, tools: ToolPlan | None = None):
        super().__init__(meta, texts)
        self._tools = tools
        self._parsers = [tools.parser() for _ in range(meta.num_choices)] if tools else None

    def _chunk(self, choice: ChatChunkChoice | None, usage: Usage | None = None) -> bytes:
        m = self.meta
        return sse(
            ChatCompletionChunk(
                id=m.id,
                created=m.created,
                model=m.model,
                choices=[choice] if choice else [],
                usage=self._usage_so_far(usage),
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
        deltas = [ChatDelta(content=out.text)] if out.text else []
        calls = 0
        if self._parsers is not None:
            parser = self._parsers[index]
            deltas = [_tool_delta(e) for e in parser.feed(out.text) + (parser.finish() if out.finished else [])]
            calls = parser.num_calls
        if not deltas and self.meta.logprobs and out.logprobs:
            deltas = [ChatDelta(content="")]
        for j, delta in enumerate(deltas):  # the step's logprobs ride on its first chunk
            lp = ChatLogprobs(content=chat_logprobs(out.logprobs, self.texts)) if self.meta.logprobs and not j else None
            lines.append(self._chunk(ChatChunkChoice(index=index, delta=delta, logprobs=lp)))
        if out.finished:
            reason = finish_reason(out.finish_reason, calls)
            lines.append(self._chunk(ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=reason)))
        return lines

    def end(self) -> list[bytes]:
        return [self._chunk(None, self.usage())] if self.meta.include_usage else []

    def _message(self, text: str) -> AssistantMessage:
        if self._tools is None:
            return AssistantMessage(content=text)
        content, calls = self._tools.parser().parse(text)
        out = [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in calls]
        return AssistantMessage(content=content, tool_calls=out or None)

    def response(self, results: list[ChoiceResult]) -> ChatCompletion:
        m = self.meta
        choices = [
            ChatChoice(
                index=i,
                message=message,
                finish_reason=finish_reason(r.finish_reason, len(message.tool_calls or [])),
                logprobs=ChatLogprobs(content=chat_logprobs(r.logprobs, self.texts)) if m.logprobs else None,
            )
            for i, r in enumerate(results)
            for message in [self._message("".join(r.text))]
        ]
        return ChatCompletion(
            id=m.id,
            created=m.created,
            model=m.model,
            choices=choices,
            usage=self.usage(sum(r.num_output_tokens for r in results), [r.num_cached_tokens for r in results]),
        )


@dataclass(frozen=True, slots=True)
class Echo:
    """The prompt a /v1/completions choice repeats before its text (`echo`)."""

    text: str
    token_ids: list[int]


class CompletionFormatter(_Formatter):
    """`echoes` (one per choice) puts each choice's prompt, and with logprobs its scores,
    before its text. `generate=False` is `max_tokens` 0: the engine still ran one token (it
    always samples after a prefill), which is dropped here, with finish reason "length"."""

    def __init__(self, meta: Meta, texts: TokenTexts, echoes: list[Echo] | None = None, generate: bool = True):
        super().__init__(meta, texts)
        self._offsets = [0] * meta.num_choices  # text offset of each choice's next token
        self._echoes = echoes
        self._generate = generate
        self._echoed = [False] * meta.num_choices

    def _chunk(self, choice: CompletionChoice | None, usage: Usage | None = None) -> bytes:
        m = self.meta
        return sse(
            Completion(
                id=m.id,
                created=m.created,
                model=m.model,
                choices=[choice] if choice else [],
                usage=self._usage_so_far(usage),
            )
        )

    def _piece(
        self, index: int, text: str, samples: list[SampleOutput], scores: list[SampleOutput] | None
    ) -> tuple[str, CompletionLogprobs | None]:
        """The next piece of a choice: its prompt first, once, if echoed; then `text`."""
        echo = None
        if self._echoes is not None and not self._echoed[index]:
            self._echoed[index] = True
            echo = self._echoes[index]
            text = echo.text + text
        if not self._generate:
            samples = []
        if not self.meta.logprobs:
            return text, None
        parts = []
        if echo is not None:
            parts.append(prompt_logprobs(echo.token_ids, scores, self.texts, self._offsets[index]))
            self._offsets[index] = next_offset(parts[-1], self._offsets[index])
        parts.append(completion_logprobs(samples, self.texts, self._offsets[index]))
        self._offsets[index] = next_offset(parts[-1], self._offsets[index])
        return text, join_logprobs(parts)

    def start(self) -> list[bytes]:
        return []

    def output(self, index: int, out: RequestOutput) -> list[bytes]:
        self._track(index, out)
        if not self._generate:
            self._completion_tokens[index] = 0
        lines = []
        text, lp = self._piece(index, out.text if self._generate else "", out.logprobs, out.prompt_logprobs)
        if text or (lp is not None and lp.tokens):
            lines.append(self._chunk(CompletionChoice(index=index, text=text, logprobs=lp)))
        if out.finished:
            reason = out.finish_reason if self._generate else "length"
            lines.append(self._chunk(CompletionChoice(index=index, text="", finish_reason=reason)))
        return lines

    def end(self) -> list[bytes]:
        return [self._chunk(None, self.usage())] if self.meta.include_usage else []

    def response(self, results: list[ChoiceResult]) -> Completion:
        m = self.meta
        choices = []
        for i, r in enumerate(results):
            text, lp = self._piece(i, "".join(r.text) if self._generate else "", r.logprobs, r.prompt_logprobs)
            reason = r.finish_reason if self._generate else "length"
            choices.append(CompletionChoice(index=i, text=text, finish_reason=reason, logprobs=lp))
        used = sum(r.num_output_tokens for r in results) if self._generate else 0
        usage = self.usage(used, [r.num_cached_tokens for r in results])
        return Completion(id=m.id, created=m.created, model=m.model, choices=choices, usage=usage)


Formatter = ChatFormatter | CompletionFormatter

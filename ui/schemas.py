"""Request bodies of the OpenAI-compatible routes, and how a raw body becomes one.

Requests are strict and closed: wrong JSON types are refused rather than coerced, unknown
fields are refused by name (`extra="forbid"`), and the OpenAI parameters this server does not
implement are refused with their own message unless they carry their no-op value (clients
such as Open WebUI send `"tools": []` or `"echo": false` on every call)."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import APIError, from_validation, param_path
from .tool_schemas import ResponseFormat, ToolCallDelta, ToolCallIn, ToolCallOut, ToolChoice, ToolDefinition

MAX_STOP = 4
# The stop checker scans held-back text against every stop string on each token (quadratic in
# a stop string's length): a bound keeps one request from stalling the shared model loop.
MAX_STOP_CHARS = 1024
MAX_CHOICES = 128  # OpenAI's limit on n; also caps prompts x n on /v1/completions
MAX_TOP_LOGPROBS = 20
_INT64 = 2**63


def join_text_parts(v: Any, kinds: tuple[str, ...], optional: frozenset[str] = frozenset()) -> Any:
    """A content list of text parts (of the types `kinds`, holding "type", "text" and at most
    the `optional` keys) -> their texts joined by newlines; anything else is returned as is."""
    if not isinstance(v, list):
        return v
    texts = []
    for i, part in enumerate(v):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind not in kinds:
            raise PydanticCustomError(
                "unsupported_content",
                "content part {index} has type '{kind}'; only {allowed} parts are supported",
                {"index": i, "kind": str(kind), "allowed": " and ".join(f"'{k}'" for k in kinds)},
            )
        if not {"type", "text"} <= set(part) <= {"type", "text", *optional} or not isinstance(part["text"], str):
            raise PydanticCustomError(
                "invalid_content",
                "content part {index} must hold 'type' and a string 'text'" + ("" if optional else ", nothing else"),
                {"index": i},
            )
        texts.append(part["text"])
    return "\n".join(texts)


def check_image_parts(v: list[Any]) -> list[dict[str, Any]]:
    """Text and `image_url` parts, each in OpenAI's shape, normalized to exactly that shape."""
    out: list[dict[str, Any]] = []
    for i, part in enumerate(v):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            out.append({"type": "text", "text": join_text_parts([part], ("text",))})
            continue
        image = part.get("image_url") if kind == "image_url" else None
        if isinstance(image, str):  # some clients send the URL itself
            image = {"url": image}
        if (
            not isinstance(image, dict)
            or set(part) != {"type", "image_url"}
            or not isinstance(image.get("url"), str)
            or not set(image) <= {"url", "detail"}
        ):
            raise PydanticCustomError(
                "invalid_content",
                "content part {index} must be a 'text' part or an 'image_url' part holding image_url.url (a string)",
                {"index": i},
            )
        out.append({"type": "image_url", "image_url": {"url": image["url"]}})
    return out


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Closed):
    include_usage: bool = False  # a last chunk with the request's usage
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries the usage so far


class ChatMessage(_Closed):
    # OpenAI's newer name for system instructions: "developer" is read as "system", the role
    # every chat template knows.
    role: Literal["system", "user", "assistant", "developer", "tool"]
    name: str | None = None  # a participant's name: passed to the template (most ignore it)
    # A list of {"type": "text", "text": ...} parts is flattened to one string here: the
    # chat templates we serve concatenate `content` as text. A list with `image_url` parts
    # stays a list of checked parts (ui/images.py reads the pictures). None only for an
    # assistant message that calls tools.
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant only: the calls it made
    tool_call_id: str | None = None  # tool only: the call this message answers

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("a tool message needs tool_call_id, and only a tool message has one")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only in an assistant message with tool_calls)")
        return self

    @field_validator("role")
    @classmethod
    def _developer_is_system(cls, v: str) -> str:
        return "system" if v == "developer" else v

    @field_validator("content", mode="before")
    @classmethod
    def _flatten_parts(cls, v: Any) -> Any:
        if isinstance(v, list) and any(isinstance(p, dict) and p.get("type") == "image_url" for p in v):
            return check_image_parts(v)
        return join_text_parts(v, ("text",))


class SamplingRequest(_Closed):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    # Declared only to be refused: name -> values that mean "not used" and so are accepted.
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {"logit_bias": ({},)}

    model: str | None = None  # None: the one model this server serves
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    max_tokens: int | None = Field(None, ge=1)
    stop: list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]] | None = Field(None, max_length=MAX_STOP)
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for OpenAI compatibility; only logged
    # Extensions (vLLM names).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False  # generate max_tokens even past end-of-sequence (benchmarks)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingRequest):
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "logit_bias": ({},),
        "functions": ([],),
        "function_call": ("none",),
    }

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None  # default: "auto" with tools, "none" without
    parallel_tool_calls: bool | None = None  # false: at most one call per reply
    response_format: ResponseFormat | None = None  # json_object / json_schema: enforced by a grammar
    max_completion_tokens: int | None = Field(None, ge=1)
    store: bool | None = None  # OpenAI keeps the completion for its dashboard; nothing to keep here
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(SamplingRequest):
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "logit_bias": ({},),
        "best_of": (1,),
        "suffix": ("",),
    }

    # Text or token ids, one prompt or a batch: "a", ["a", "b"], [1, 2], [[1, 2], [3]].
    prompt: list[str] | list[list[int]] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # 0 generates nothing: with echo, the prompt alone is scored (evaluation harnesses).
    max_tokens: int | None = Field(None, ge=0)
    echo: bool = False  # the prompt comes back before the completion (with its logprobs)

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompts(cls, v: Any, handler: Any) -> Any:
        if isinstance(v, str) or (isinstance(v, list) and v and type(v[0]) is int):
            v = [v]
        if v == []:
            raise PydanticCustomError("invalid_prompt", "must not be empty")
        try:
            return handler(v)
        except ValidationError:  # one message, not one per member of the union
            raise PydanticCustomError(
                "invalid_prompt",
                "must be a string, a list of strings, a list of token ids or a list of lists of token ids",
            ) from None


Req = TypeVar("Req", bound=SamplingRequest)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _is_noop(value: Any, noops: tuple[Any, ...]) -> bool:
    # Compare types too: 0 == False in Python, but `"echo": 0` is not the no-op `false`.
    return value is None or any(type(value) is type(n) and value == n for n in noops)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")  # C speed; fails only on a lone surrogate
    except UnicodeEncodeError:
        return False
    return True


def _surrogate_at(value: Any, loc: tuple[Any, ...] = ()) -> tuple[tuple[Any, ...], bool] | None:
    """Where in a parsed body a string (or, flag True, a key) holds a lone UTF-16 surrogate.
    JSON lets a client write one ("\\ud800"), but it is no character: the tokenizer and every
    UTF-8 encoder downstream would fail on it."""
    if isinstance(value, str):
        return None if _is_unicode(value) else (loc, False)
    if isinstance(value, dict):
        for k, v in value.items():
            if not _is_unicode(k):
                return loc, True
            if (found := _surrogate_at(v, (*loc, k))) is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if (found := _surrogate_at(v, (*loc, i))) is not None:
                return found
    return None


def parse_request(raw: bytes, model: type[Req]) -> Req:
    """Raw body -> validated request, or an APIError (400) that names the offending field."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    if (found := _surrogate_at(body)) is not None:
        loc, in_key = found
        param = param_path(loc) or None
        where = f"a key of '{param}'" if in_key and param else ("a key" if in_key else f"'{param}'")
        raise APIError(
            400,
            f"Invalid value for {where}: the text contains a lone UTF-16 surrogate, which is not valid Unicode.",
            param,
            "invalid_value",
        )
    for name, noops in model.UNSUPPORTED.items():
        if name in body:
            if not _is_noop(body[name], noops):
                raise APIError(
                    400,
                    f"Unsupported parameter: '{name}' is not supported by this server.",
                    name,
                    "unsupported_parameter",
                )
            del body[name]
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise from_validation(e.errors()) from None


# -- responses ---------------------------------------------------------------------------------
class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptTokensDetails(_Out):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[TokenLogprob] | None


class AssistantMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None

    @model_serializer(mode="wrap")
    def _drop_no_calls(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        if out.get("tool_calls") is None:
            out.pop("tool_calls", None)
        return out


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        # OpenAI sends only the keys a delta carries: {"role": ...} first, {"content": ...}
        # after, {} with the finish reason.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(_Out):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Out):
    tokens: list[str]
    # None for an echoed prompt's first token: nothing comes before it to score it against.
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(_Out):
    """Both the whole response and each streamed chunk (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ringllm"


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]

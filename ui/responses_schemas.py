"""Request and response bodies of the Responses API (POST /v1/responses).

The request is strict and closed like the other routes' (ui/schemas.py): unknown fields are
refused by name, and OpenAI parameters this server cannot honour are refused unless they
carry their no-op value. Output shapes follow `openai.types.responses` (the SDK parses them)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from .errors import APIError, from_validation
from .schemas import join_text_parts
from .tool_calls import FunctionTool

_TEXT_PARTS = ("input_text", "output_text")
_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names
Status = Literal["in_progress", "completed", "incomplete", "failed"]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class InputMessage(_Closed):
    """One turn of `input`: OpenAI's "easy" message or an output message passed back.

    Content is a string or a list of text parts (`input_text`, or `output_text` as an earlier
    response gave it), joined with newlines. Fields an output message carries back (`id`,
    `status`, `phase`) are accepted and have no effect."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str
    id: str | None = None
    status: str | None = None
    phase: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _flatten_parts(cls, v: Any) -> Any:
        # An output_text part passed back carries its annotations (and logprobs): no effect.
        return join_text_parts(v, _TEXT_PARTS, frozenset({"annotations", "logprobs"}))

    def chat_message(self) -> dict[str, Any]:
        # "developer" is OpenAI's newer "system": the role every chat template knows.
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class FunctionCallInput(_Closed):
    """A call the model made earlier (an output item passed back)."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputInput(_Closed):
    """The result of a call, for the model to read."""

    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None

    @field_validator("output", mode="before")
    @classmethod
    def _join_texts(cls, v: Any) -> Any:
        """A result given as text parts, as one string (other parts stay and are refused)."""
        if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "input_text" for p in v):
            return "\n".join(str(p.get("text", "")) for p in v)
        return v


InputItem = InputMessage | FunctionCallInput | FunctionCallOutputInput
_ITEM_TYPES: dict[str, type[InputItem]] = {
    "message": InputMessage,
    "function_call": FunctionCallInput,
    "function_call_output": FunctionCallOutputInput,
}


def input_items(raw: list[Any]) -> list[InputItem]:
    """Each item validated as the model its `type` names (a message when it has none), so
    that an error names the item's own field: `input[2].call_id`, not a union member's."""
    items: list[InputItem] = []
    for i, item in enumerate(raw):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        model = _ITEM_TYPES.get(kind) if isinstance(kind, str) else None
        if model is None:
            raise APIError(
                400,
                f"Input item {i} has type '{kind}': only messages, function_call and function_call_output "
                "items are supported.",
                f"input[{i}]",
                "unsupported_value",
            )
        try:
            items.append(model.model_validate(item))
        except ValidationError as e:
            raise from_validation([{**err, "loc": ("input", i, *err["loc"])} for err in e.errors()]) from None
    return items


def chat_messages(items: list[Any]) -> list[dict[str, Any]]:
    """Input items as chat messages: function calls join the assistant turn before them
    (`tool_calls`), results become `tool` messages."""
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, InputMessage):
            out.append(item.chat_message())
        elif isinstance(item, FunctionCallInput):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            if not (out and out[-1]["role"] == "assistant"):
                out.append({"role": "assistant", "content": ""})
            out[-1] = {**out[-1], "tool_calls": [*out[-1].get("tool_calls", []), call]}
        else:
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return out


class FunctionToolIn(_Closed):
    type: Literal["function"]
    name: str = Field(pattern=_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; absent: no arguments
    strict: bool | None = None  # true: arguments always match `parameters` (enforced by a grammar)

    def to_tool(self) -> FunctionTool:
        return FunctionTool(self.name, self.description, self.parameters, bool(self.strict))


class NamedFunction(_Closed):
    type: Literal["function"]
    name: str


class StreamOptions(_Closed):
    include_obfuscation: bool = True  # padding against length side channels: none is sent


class TextFormat(_Closed):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Closed):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # the model's only verbosity


class ResponsesRequest(_Closed):
    # Declared only to be refused: name -> values that mean "not used" and so are accepted.
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "max_tool_calls": (),
        "include": ([],),
        "top_logprobs": (0,),
        "reasoning": ({},),
        "truncation": ("disabled",),
        "background": (False,),
        "conversation": (),
        "prompt": (),
        "context_management": (),
        "moderation": (),
        "image": (),
        "access_programs": (),
        "prompt_cache_options": (),
        "prompt_cache_retention": (),
        "service_tier": ("auto", "default"),
    }

    model: str | None = None
    input: list[InputItem] = Field(min_length=1)
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    text: TextConfig | None = None
    tools: list[FunctionToolIn] | None = None  # function tools only: nothing else runs here
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    stream: bool | None = False
    # Parameters with nothing to change on a local server, accepted as OpenAI documents them.
    store: bool | None = True  # keep the response in memory for previous_response_id and GET
    metadata: dict[str, str] | None = None  # returned with the response
    stream_options: StreamOptions | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _items(cls, v: Any) -> Any:
        # APIError, not a pydantic error, for a bad item: it passes through to the client as is.
        if isinstance(v, str):
            v = [{"role": "user", "content": v}]
        return input_items(v) if isinstance(v, list) else v

    @field_validator("tool_choice", mode="wrap")
    @classmethod
    def _one_choice_error(cls, v: Any, handler: Any) -> Any:
        try:
            return handler(v)
        except ValidationError:  # one message, not one per member of the union
            raise PydanticCustomError(
                "invalid_tool_choice", "must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}"
            ) from None

    @property
    def choice(self) -> str | None:
        """tool_choice as `prepare_chat` takes it: a mode, or the name of a function."""
        return self.tool_choice.name if isinstance(self.tool_choice, NamedFunction) else self.tool_choice

    def content_schema(self) -> dict[str, Any] | bool | None:
        """What the reply's text must match (`text.format`); None for free text."""
        fmt = self.text.format if self.text is not None else None
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return {"type": "object"}
        return True if fmt.schema_ is None else fmt.schema_


# -- output ---------------------------------------------------------------------------------------
class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OutputText(_Out):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(_Out):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Status
    content: list[OutputText]


class FunctionCallItem(_Out):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: Status


class InputTokensDetails(_Out):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(_Out):
    reasoning_tokens: int = 0


class ResponseUsage(_Out):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseError(_Out):
    code: str
    message: str


class IncompleteDetails(_Out):
    reason: Literal["max_output_tokens"]


class ResponseObject(_Out):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: Status
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    instructions: str | None
    output: list[OutputMessage | FunctionCallItem]
    max_output_tokens: int | None
    temperature: float
    top_p: float
    previous_response_id: str | None
    store: bool
    metadata: dict[str, str]
    text: dict[str, Any]
    user: str | None = None
    usage: ResponseUsage | None = None
    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, str]
    parallel_tool_calls: bool
    # What a client reads even where nothing applies: no reasoning, no truncation.
    reasoning: dict[str, Any] = Field(default_factory=lambda: {"effort": None, "summary": None})
    truncation: Literal["disabled"] = "disabled"
    background: bool = False

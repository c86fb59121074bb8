"""The chat request's tool and structured-output fields, and the tool calls of its response:
`tools`, `tool_choice`, `response_format`, assistant `tool_calls` in the history, and
`message.tool_calls` / streamed `delta.tool_calls` (OpenAI's shapes)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from .tool_calls import FunctionTool

# OpenAI's rule for function names.
_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FunctionDefinition(_Closed):
    name: str = Field(pattern=_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; absent: no arguments
    strict: bool | None = None  # true: arguments always match `parameters` (enforced by a grammar)


class ToolDefinition(_Closed):
    type: Literal["function"]
    function: FunctionDefinition

    def to_tool(self) -> FunctionTool:
        f = self.function
        return FunctionTool(f.name, f.description, f.parameters, bool(f.strict))


class FunctionName(_Closed):
    name: str


class NamedToolChoice(_Closed):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCallIn(_Closed):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCallIn(_Closed):
    """A call in an assistant message of the history."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class JsonSchemaFormat(_Closed):
    name: str = Field(pattern=_NAME)
    description: str | None = None
    # `schema` would shadow a BaseModel attribute: stored as schema_, read and written as "schema".
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None  # enforced whether true or not: a valid reply is always allowed


class ResponseFormat(_Closed):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only allowed with it")
        return self

    def content_schema(self) -> dict[str, Any] | bool | None:
        """What the reply's content must match; None for free text."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.json_schema is not None:
            schema = self.json_schema.schema_
            return True if schema is None else schema  # no schema: any JSON value
        return None


# -- responses -----------------------------------------------------------------------------------
class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionCallOut(_Out):
    name: str
    arguments: str


class ToolCallOut(_Out):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class FunctionCallDelta(_Out):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Out):
    """A streamed piece of a call: the first carries id, type and name; later ones only
    argument text (OpenAI's shape; the keys a piece lacks are left out)."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        out["function"] = {k: v for k, v in out["function"].items() if v is not None}
        return {k: v for k, v in out.items() if v is not None}

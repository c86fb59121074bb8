"""Tool calling and structured output for chat-shaped requests, independent of the route.

`prepare_chat` turns a chat (OpenAI-style message dicts), its function tools, the tool choice
and an optional content schema (`response_format`) into what the engine runs: the messages
and tool list for the model's chat template, the grammar that constrains the output (if
any), and a `ToolPlan` whose parsers read tool calls back out of the text. The chat
completions route uses it; the Responses API can too (convert its items to message dicts and
its tools to `FunctionTool`s first).

The template family decides how tools reach the model and how calls come back:
- HERMES (a template that writes `<tool_call>`: Qwen2/2.5, Hermes): the template renders the
  tools; calls are `<tool_call>{"name", "arguments"}</tool_call>` blocks.
- LLAMA3 (a template with Llama 3.1's `ipython` environment): the template renders the tools;
  a call is the reply `{"name", "parameters"}`.
- GENERIC (any other template, e.g. SmolLM2's): the tool list and the reply format go into
  the system prompt; a call is the reply `{"name", "arguments"}`.
`tool_choice` "required" or a named function is enforced by a grammar over these forms (the
arguments follow each function's JSON schema), as is "auto" when a function is `strict` or a
content schema is given (then the reply is either such content or a valid call)."""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inference.errors import InvalidParameter
from inference.grammar import Grammar, lark_json

from .tool_parsers import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, HermesParser, JsonCallParser, ToolCallParser

_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class ToolFormat(enum.Enum):
    HERMES = "hermes"
    LLAMA3 = "llama3"
    GENERIC = "generic"


def detect_format(chat_template: str | None) -> ToolFormat:
    """The tool-call family of a chat template (GENERIC for one without tool support)."""
    t = chat_template or ""
    if TOOL_CALL_OPEN in t:
        return ToolFormat.HERMES
    if "<|python_tag|>" in t or "Environment: ipython" in t:
        return ToolFormat.LLAMA3
    return ToolFormat.GENERIC


@dataclass(frozen=True, slots=True)
class FunctionTool:
    """A function the model may call: OpenAI's `{"type": "function", "function": {...}}`."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool = False

    def openai(self) -> dict[str, Any]:
        fn: dict[str, Any] = {"name": self.name, "parameters": self.parameters or _NO_PARAMETERS}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How one request's tool calls come back: the family, the callable functions, and
    whether several calls may come in one reply."""

    format: ToolFormat
    tools: tuple[FunctionTool, ...]
    parallel: bool = True

    def parser(self) -> ToolCallParser:
        """A fresh parser for one choice's output."""
        names = [t.name for t in self.tools]
        cls = HermesParser if self.format is ToolFormat.HERMES else JsonCallParser
        return cls(names, None if self.parallel else 1)


@dataclass(slots=True)
class ChatSetup:
    """What one chat request runs: `encode_chat(messages, template_tools)`, sampled under
    `grammar` (None: unconstrained), its output read by `tools` (None: plain content)."""

    messages: list[dict[str, Any]]
    template_tools: list[dict[str, Any]] | None
    grammar: Grammar | None
    tools: ToolPlan | None
    content: Grammar | None = None  # the content schema's own grammar, to blame it by name
    tool_indexes: tuple[int, ...] = ()  # where each of `tools.tools` is in the request's list


def prepare_chat(
    chat_template: str | None,
    messages: list[dict[str, Any]],
    tools: list[FunctionTool],
    tool_choice: str | None = None,
    parallel: bool = True,
    content_schema: dict[str, Any] | bool | None = None,
    content_param: str = "response_format",
) -> ChatSetup:
    """`tool_choice`: "auto" (the default with tools), "none", "required", or the name of a
    function in `tools` (already checked by the caller). `content_schema`: what plain
    content must match (None: free text). Raises InvalidParameter for a bad schema (pure:
    compiling it against the tokenizer is `check_setup`'s job)."""
    fmt = detect_format(chat_template)
    choice = tool_choice or ("auto" if tools else "none")
    indexes = (
        []
        if choice == "none"
        else [i for i, t in enumerate(tools) if choice in ("auto", "required") or t.name == choice]
    )
    callable_tools = [tools[i] for i in indexes]
    content = Grammar.json_schema(content_schema, content_param) if content_schema is not None else None
    rendered = render_messages(fmt, messages, callable_tools, choice)
    if not callable_tools:
        return ChatSetup(rendered, None, content, None, content)
    plan = ToolPlan(fmt, tuple(callable_tools), parallel)
    native = fmt is not ToolFormat.GENERIC
    template_tools = [t.openai() for t in callable_tools] if native else None
    grammar = content
    if choice != "auto":
        grammar = Grammar.lark(f"start: calls\n{_calls_rules(plan)}", "tools")
    elif content_schema is not None or any(t.strict for t in callable_tools):
        rules = f"start: content | calls\n{_content_rules(fmt, content_schema)}\n{_calls_rules(plan)}"
        grammar = Grammar.lark(rules, "tools")
    return ChatSetup(rendered, template_tools, grammar, plan, content, tuple(indexes))


def check_setup(setup: ChatSetup, check: Callable[[Grammar], None]) -> None:
    """Compile the setup's grammar with `check` (the engine's `check_grammar`); when a tool
    grammar fails, find the function whose parameters are at fault and name it."""
    if setup.grammar is None:
        return
    try:
        check(setup.grammar)
    except InvalidParameter:
        if setup.content is not None and setup.content is not setup.grammar:
            check(setup.content)
        if setup.tools is not None and setup.grammar.param == "tools":
            for i, tool in zip(setup.tool_indexes, setup.tools.tools):
                check(Grammar.json_schema(tool.parameters or _NO_PARAMETERS, f"tools[{i}].function.parameters"))
        raise


def encode_setup(engine: Any, setup: ChatSetup) -> list[int]:
    """The prompt's token ids (an AsyncEngine's `encode_chat`), once its grammar (if any)
    compiles. Blocking: call it off the event loop."""
    check_setup(setup, engine.check_grammar)
    return engine.encode_chat(setup.messages, setup.template_tools)


def finish_reason(reason: str | None, num_calls: int) -> str | None:
    """OpenAI's finish reason: a reply that ended on its own after calling tools says so."""
    return "tool_calls" if num_calls and reason == "stop" else reason


# -- grammars ----------------------------------------------------------------------------------
def _call_schema(plan: ToolPlan) -> dict[str, Any]:
    key = "parameters" if plan.format is ToolFormat.LLAMA3 else "arguments"
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, key: t.parameters or _NO_PARAMETERS},
            "required": ["name", key],
            "additionalProperties": False,
        }
        for t in plan.tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _calls_rules(plan: ToolPlan) -> str:
    body = lark_json(_call_schema(plan))
    if plan.format is not ToolFormat.HERMES:
        return f"calls: {body}"
    more = ' ("\\n" call)*' if plan.parallel else ""
    return f'calls: call{more}\ncall: "{TOOL_CALL_OPEN}\\n" call_json "\\n{TOOL_CALL_CLOSE}"\ncall_json: {body}'


def _content_rules(fmt: ToolFormat, schema: dict[str, Any] | bool | None) -> str:
    if schema is not None:
        return f"content: {lark_json(schema)}"
    if fmt is ToolFormat.HERMES:  # any text without a <tool_call> tag
        return f"content: TEXT\nTEXT: /(?s:.+)/ & ~/(?s:.*{TOOL_CALL_OPEN}.*)/"
    return "content: TEXT\nTEXT: /\\s*[^{\\s](?s:.*)/"  # any text that does not open a JSON object


# -- prompts -----------------------------------------------------------------------------------
def _arguments_value(arguments: str) -> Any:
    # Templates write a call's arguments with `| tojson`: give them the object, not its text.
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments


def render_messages(
    fmt: ToolFormat, messages: list[dict[str, Any]], tools: list[FunctionTool], choice: str
) -> list[dict[str, Any]]:
    """Messages as the chat template takes them. Native families get assistant `tool_calls`
    with their arguments as objects and `tool` messages with the function's name; GENERIC
    gets calls as the JSON text the model was asked to write, tool results as user turns,
    and the tool list in the system prompt."""
    names: dict[str, str] = {}  # tool_call_id -> function name, for the tool messages
    out: list[dict[str, Any]] = []
    for m in messages:
        calls = m.get("tool_calls") or []
        for c in calls:
            names[c["id"]] = c["function"]["name"]
        if m["role"] == "assistant" and calls:
            if fmt is ToolFormat.GENERIC:
                text = [m.get("content") or ""] + [_generic_call_text(c) for c in calls]
                out.append({"role": "assistant", "content": "\n".join(t for t in text if t)})
            else:
                rendered = [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {
                            "name": c["function"]["name"],
                            "arguments": _arguments_value(c["function"]["arguments"]),
                        },
                    }
                    for c in calls
                ]
                out.append({"role": "assistant", "content": m.get("content") or "", "tool_calls": rendered})
        elif m["role"] == "tool":
            name = names.get(m.get("tool_call_id") or "", "")
            if fmt is ToolFormat.GENERIC:
                result = f"Result of {name or 'the tool call'}: {m.get('content') or ''}"
                if out and out[-1].get("_tool_results"):
                    out[-1]["content"] += "\n" + result
                else:
                    out.append({"role": "user", "content": result, "_tool_results": True})
            else:
                out.append(
                    {
                        "role": "tool",
                        "content": m.get("content") or "",
                        "tool_call_id": m.get("tool_call_id"),
                        "name": name,
                    }
                )
        else:
            out.append({k: v for k, v in m.items() if k != "tool_calls"})
    for m in out:
        m.pop("_tool_results", None)
    if fmt is ToolFormat.GENERIC and tools:
        _add_to_system(out, _generic_system_text(tools, choice))
    return out


def _generic_call_text(call: dict[str, Any]) -> str:
    fn = call["function"]
    return json.dumps({"name": fn["name"], "arguments": _arguments_value(fn["arguments"])}, ensure_ascii=False)


def _generic_system_text(tools: list[FunctionTool], choice: str) -> str:
    listing = "\n".join(json.dumps(t.openai()["function"], ensure_ascii=False) for t in tools)
    form = '{"name": "<function name>", "arguments": {<argument name>: <value>, ...}}'
    if choice == "auto":
        when = "If a function helps, reply with only a JSON object of the form " + form + ". Otherwise reply normally."
    elif choice == "required":
        when = "Call one of them: reply with only a JSON object of the form " + form + "."
    else:
        when = f'Call the function "{choice}": reply with only a JSON object of the form {form}.'
    return f"You can call these functions:\n{listing}\n{when}"


def _add_to_system(messages: list[dict[str, Any]], text: str) -> None:
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        messages[0] = {**first, "content": f"{first.get('content') or ''}\n\n{text}".lstrip()}
    else:
        messages.insert(0, {"role": "system", "content": text})

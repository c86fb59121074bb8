"""Tool calls read back out of model text (ui/tool_parsers.py) and the chat set-up around them
(ui/tool_calls.py): each family on fixed strings, whole and streamed in pieces, and how
messages, tools and tool_choice reach the template and the grammar. No model needed."""

from __future__ import annotations

import json

import pytest

from ui.tool_calls import FunctionTool, ToolFormat, ToolPlan, detect_format, prepare_chat, render_messages
from ui.tool_parsers import (
    ContentDelta,
    HermesParser,
    JsonCallParser,
    ToolArgsDelta,
    ToolCallParser,
    ToolCallStart,
    collect,
)

NAMES = ["get_weather", "add"]
WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'


def _result(content, calls):
    return content, [(c.name, c.arguments) for c in calls]


def _streamed(parser: ToolCallParser, text: str, size: int):
    """Feed `text` in pieces of `size` chars; the events, and their content and calls."""
    events = []
    for i in range(0, len(text), size):
        events += parser.feed(text[i : i + size])
    events += parser.finish()
    return events, _result(*collect(events))


def _same_in_any_pieces(cls, text: str, **kw):
    """Parse whole, then streamed in pieces of every size from 1 to 7: always the same."""
    whole = _result(*cls(NAMES, **kw).parse(text))
    for size in range(1, 8):
        assert _streamed(cls(NAMES, **kw), text, size)[1] == whole, f"pieces of {size}"
    return whole


# -- Hermes (Qwen2) ---------------------------------------------------------------------------
def test_hermes_one_call():
    text = f"<tool_call>\n{WEATHER}\n</tool_call>"
    assert _same_in_any_pieces(HermesParser, text) == (None, [("get_weather", '{"city": "Paris", "unit": "celsius"}')])


def test_hermes_content_then_two_calls():
    text = (
        "Let me check.\n\n<tool_call>\n"
        + WEATHER
        + '\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": {"c": "}{"}}}\n</tool_call>\n'
    )
    content, calls = _same_in_any_pieces(HermesParser, text)
    assert content == "Let me check."
    assert calls == [("get_weather", '{"city": "Paris", "unit": "celsius"}'), ("add", '{"a": 1, "b": {"c": "}{"}}')]


def test_hermes_parallel_false_keeps_the_first_call():
    text = f"<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n" + '{"name": "add", "arguments": {}}\n</tool_call>'
    assert _same_in_any_pieces(HermesParser, text, max_calls=1)[1] == [
        ("get_weather", '{"city": "Paris", "unit": "celsius"}')
    ]


def test_hermes_plain_text_and_near_tags_are_content():
    assert _same_in_any_pieces(HermesParser, "Hello <tool> and <tool_ world\n") == (
        "Hello <tool> and <tool_ world\n",
        [],
    )
    # A block naming no known function is no call: it stays content, tags and all.
    text = '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>'
    assert _same_in_any_pieces(HermesParser, text) == (text, [])


def test_hermes_keys_in_other_order_and_string_arguments():
    text = '<tool_call>{"arguments": {"a": 1}, "name": "add"}</tool_call>'
    assert _same_in_any_pieces(HermesParser, text) == (None, [("add", '{"a": 1}')])
    text = '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>'
    assert _same_in_any_pieces(HermesParser, text) == (None, [("add", '{"a": 1}')])


def test_hermes_truncated_call_keeps_what_was_streamed():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    assert _same_in_any_pieces(HermesParser, text) == (None, [("get_weather", '{"city": "Par')])


def test_hermes_streams_name_first_then_argument_fragments():
    text = f"<tool_call>\n{WEATHER}\n</tool_call>"
    events, _ = _streamed(HermesParser(NAMES), text, 3)
    assert isinstance(events[0], ToolCallStart) and events[0].name == "get_weather" and events[0].index == 0
    assert events[0].id.startswith("call_")
    frags = events[1:]
    assert len(frags) > 3 and all(isinstance(e, ToolArgsDelta) and e.index == 0 for e in frags)
    assert "".join(e.text for e in frags if isinstance(e, ToolArgsDelta)) == '{"city": "Paris", "unit": "celsius"}'


def test_hermes_partial_tag_is_held_back_until_decided():
    p = HermesParser(NAMES)
    assert p.feed("Hi <tool_") == [ContentDelta("Hi")]
    assert p.feed("ca") == []
    assert p.feed("ll>\n") == []  # a block opened: nothing is content
    ev = p.feed('{"name": "add", "arguments": {')
    assert isinstance(ev[0], ToolCallStart) and ev[0].name == "add" and ev[1:] == [ToolArgsDelta(0, "{")]


# -- JSON calls (Llama 3, generic) -------------------------------------------------------------
def test_llama3_parameters_form_and_semicolons():
    text = '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "add", "parameters": {"a": 2}}'
    assert _same_in_any_pieces(JsonCallParser, text) == (
        None,
        [("get_weather", '{"city": "Paris"}'), ("add", '{"a": 2}')],
    )


def test_generic_arguments_form_with_whitespace():
    text = '\n {"name": "add", "arguments": {"a": 1, "b": [2, {"c": null}]}}\n'
    assert _same_in_any_pieces(JsonCallParser, text) == (None, [("add", '{"a": 1, "b": [2, {"c": null}]}')])


def test_generic_plain_reply_and_non_call_json_are_content():
    assert _same_in_any_pieces(JsonCallParser, "The weather is {nice}.") == ("The weather is {nice}.", [])
    assert _same_in_any_pieces(JsonCallParser, '{"answer": 42} and more') == ('{"answer": 42} and more', [])
    assert _same_in_any_pieces(JsonCallParser, '{"name": "unknown", "arguments": {}}') == (
        '{"name": "unknown", "arguments": {}}',
        [],
    )
    assert _same_in_any_pieces(JsonCallParser, "  ") == ("  ", [])
    assert _same_in_any_pieces(JsonCallParser, '{"name": ["add"], "arguments": {}}')[1] == []


def test_generic_text_after_a_call_is_content():
    text = '{"name": "add", "arguments": {"a": 1}} Done.'
    assert _same_in_any_pieces(JsonCallParser, text) == ("Done.", [("add", '{"a": 1}')])


def test_generic_truncated_object_without_a_head_is_content():
    text = '{"arguments": {"a": 1'
    assert _same_in_any_pieces(JsonCallParser, text) == (text, [])


# -- set-up: families, messages, grammars -------------------------------------------------------
TOOLS = [
    FunctionTool("get_weather", "Weather in a city", {"type": "object", "properties": {"city": {"type": "string"}}}),
    FunctionTool("add", None, None, strict=True),
]
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
]


def test_detect_format():
    assert detect_format("{% for m in messages %}<tool_call>{% endfor %}") is ToolFormat.HERMES
    assert detect_format("Environment: ipython\n{{ tools }}") is ToolFormat.LLAMA3
    assert detect_format("<|im_start|>{{ m.content }}") is ToolFormat.GENERIC
    assert detect_format(None) is ToolFormat.GENERIC


def test_native_messages_get_argument_objects_and_tool_names():
    out = render_messages(ToolFormat.HERMES, HISTORY, TOOLS, "auto")
    assert out[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert out[1]["content"] == ""
    assert out[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1", "name": "get_weather"}


def test_generic_messages_carry_tools_in_the_system_prompt():
    out = render_messages(ToolFormat.GENERIC, [{"role": "system", "content": "Be brief."}, *HISTORY], TOOLS, "required")
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.\n\n")
    assert '"name": "get_weather"' in out[0]["content"] and "Call one of them" in out[0]["content"]
    assert json.loads(out[2]["content"]) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert out[3] == {"role": "user", "content": "Result of get_weather: sunny"}
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]


@pytest.mark.parametrize("template", ["<tool_call>", "Environment: ipython", "plain"])
def test_grammars_per_choice(template):
    none = prepare_chat(template, HISTORY, TOOLS, "none")
    assert none.grammar is None and none.tools is None and none.template_tools is None
    auto = prepare_chat(template, HISTORY, TOOLS[:1], "auto")
    assert auto.grammar is None and auto.tools is not None  # free text or a call, parsed back
    strict = prepare_chat(template, HISTORY, TOOLS, "auto")
    assert strict.grammar is not None  # a strict function: its calls are constrained too
    named = prepare_chat(template, HISTORY, TOOLS, "add")
    assert named.grammar is not None and named.grammar.param == "tools"
    assert named.tools is not None and [t.name for t in named.tools.tools] == ["add"] and named.tool_indexes == (1,)
    native = detect_format(template) is not ToolFormat.GENERIC
    assert (named.template_tools is not None) == native
    fmt = prepare_chat(template, HISTORY, [], None, content_schema={"type": "object"})
    assert fmt.grammar is not None and fmt.grammar.param == "response_format"


def test_plan_parser_follows_family_and_parallel():
    assert isinstance(ToolPlan(ToolFormat.HERMES, tuple(TOOLS)).parser(), HermesParser)
    one = ToolPlan(ToolFormat.GENERIC, tuple(TOOLS), parallel=False).parser()
    assert isinstance(one, JsonCallParser) and one.max_calls == 1

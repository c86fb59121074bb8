"""Tool calling and structured output on /v1/chat/completions against a live server, driven by
the official `openai` client: every tool_choice, streamed calls, a history with tool results,
response_format json_object / json_schema (and the SDK's `parse` with a pydantic model), and
that a constrained request never changes an unconstrained one batched with it.

The default model's template has no tool support, so calls take the generic form (the tool
list in the system prompt, the reply a JSON object); the Hermes and Llama 3 forms are covered
by tests/test_tool_parsers.py and tests/test_grammar.py. One server for the module."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

from .test_api import MODEL, _launch, _stop, _wait_ready

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
# Greedy replies of the default model that close their JSON well within the token budget.
JSON_PROMPTS = ["Describe a person as JSON.", "Invent a user profile.", "Who is Alice?"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = _launch(tmp_path_factory.mktemp("servers"), "tools")
    try:
        yield _wait_ready(started)
    finally:
        _stop(started)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(client, content: str, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 80)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def _check(schema: dict[str, Any], value: Any, where: str = "$") -> None:
    """A hand check of the JSON schema subset these tests use (jsonschema is not installed)."""
    kind = schema.get("type")
    if "enum" in schema:
        assert value in schema["enum"], where
    if kind == "object":
        assert isinstance(value, dict), where
        assert set(schema.get("required", [])) <= set(value), where
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(schema["properties"]), where
        for k, v in value.items():
            if k in schema.get("properties", {}):
                _check(schema["properties"][k], v, f"{where}.{k}")
    elif kind == "string":
        assert isinstance(value, str), where
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), where
    elif kind == "number":
        assert isinstance(value, int | float) and not isinstance(value, bool), where


def _valid_calls(message, names: set[str], schema: bool = True) -> list[tuple[str, str]]:
    """The calls of `message`: known names, arguments a JSON object (valid under the function's
    schema unless `schema` is False: "auto" without `strict` guarantees no more than that)."""
    assert message.tool_calls, message
    out = []
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        args = json.loads(call.function.arguments)
        assert isinstance(args, dict)
        if schema:
            _check(SCHEMAS[call.function.name], args)
        out.append((call.function.name, call.function.arguments))
    return out


# -- tool_choice ----------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["What is 2 plus 3?", "Hello!"])
def test_required_and_named_always_call_with_valid_arguments(client, prompt):
    r = _chat(client, prompt, tools=TOOLS, tool_choice="required")
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    _valid_calls(r.choices[0].message, {"get_weather", "add"})
    # Named: that function, even when the question is about another one.
    r = _chat(client, prompt, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert [name for name, _ in _valid_calls(r.choices[0].message, {"get_weather"})] == ["get_weather"]
    assert r.choices[0].finish_reason == "tool_calls"


def test_auto_and_none_are_well_formed(client):
    for prompt in ("What is 2 plus 3?", "Is it raining in London?"):
        r = _chat(client, prompt, tools=TOOLS, parallel_tool_calls=False)
        choice = r.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
            _valid_calls(choice.message, {"get_weather", "add"}, schema=False)
        else:
            assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    r = _chat(client, "What is 2 plus 3?", tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


def test_auto_with_strict_functions_is_text_or_a_valid_call(client):
    strict = [{"type": t["type"], "function": t["function"] | {"strict": True}} for t in TOOLS]
    for prompt in ("What is 2 plus 3?", "Hello!"):
        choice = _chat(client, prompt, tools=strict).choices[0]
        if choice.message.tool_calls:
            _valid_calls(choice.message, {"get_weather", "add"})
            assert choice.finish_reason == "tool_calls"
        else:  # plain text, which must not open a JSON object (that would have been a call)
            assert not choice.message.content.lstrip().startswith("{")


def test_streamed_call_reassembles_to_the_whole_one(client):
    kw = dict(tools=TOOLS, tool_choice="required")
    whole = _chat(client, "Is it raining in London?", **kw).choices[0].message
    chunks = list(_chat(client, "Is it raining in London?", stream=True, **kw))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    pieces = [tc for d in deltas for tc in d.tool_calls or []]
    first, rest = pieces[0], pieces[1:]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == whole.tool_calls[0].function.name and first.function.arguments == ""
    assert rest and all(p.id is None and p.function.name is None for p in rest)
    calls: dict[int, str] = {}
    for p in pieces:
        calls[p.index] = calls.get(p.index, "") + (p.function.arguments or "")
    assert [calls[i] for i in sorted(calls)] == [c.function.arguments for c in whole.tool_calls]
    assert not any(d.content for d in deltas)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_raw_stream_pieces_carry_only_their_keys(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Add 1 and 2."}], "max_tokens": 60}
    body |= {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "add"}}, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    pieces = [tc for e in events for tc in e["choices"][0]["delta"].get("tool_calls", [])]
    assert set(pieces[0]) == {"index", "id", "type", "function"} and set(pieces[0]["function"]) == {"name", "arguments"}
    assert all(p.keys() == {"index", "function"} and p["function"].keys() == {"arguments"} for p in pieces[1:])


def test_history_with_tool_results_is_accepted(client):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=40)
    message = r.choices[0].message
    assert message.tool_calls is None or _valid_calls(message, {"get_weather", "add"}, schema=False)
    # Without tools in the request the history still renders.
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=10)
    assert r.choices[0].message.content


# -- response_format ------------------------------------------------------------------------------
def test_json_object_output_parses(client):
    # (An open-ended object can also run on: greedy, this model nests {"type": "json", "data": {...}}.)
    for prompt in (
        "Return a JSON object with keys name and age.",
        "Give me a JSON object with the name and age of a cat.",
    ):
        r = _chat(client, prompt, response_format={"type": "json_object"}, max_tokens=120)
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_validates(client, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for prompt in JSON_PROMPTS if not stream else JSON_PROMPTS[:1]:
        r = _chat(client, prompt, response_format=fmt, max_tokens=120, stream=stream)
        if stream:
            chunks = [c.choices[0] for c in r if c.choices]
            text, reason = "".join(c.delta.content or "" for c in chunks), chunks[-1].finish_reason
        else:
            text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert reason == "stop"
        _check(PERSON, json.loads(text))


class Person(BaseModel):
    name: str
    age: int
    city: str
    kind: Literal["human", "robot"]


def test_sdk_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": JSON_PROMPTS[0]}],
        response_format=Person,
        temperature=0,
        max_tokens=120,
    )
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Person) and parsed.kind in ("human", "robot")


def test_unconstrained_request_is_unchanged_by_a_constrained_neighbour(server):
    plain = {"model": MODEL, "messages": [{"role": "user", "content": "Name three colors."}], "temperature": 0}
    plain["max_tokens"] = 32
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    constrained = plain | {"messages": [{"role": "user", "content": JSON_PROMPTS[1]}], "response_format": fmt}
    constrained["max_tokens"] = 60

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120) as c:
            alone = await c.chat.completions.create(**plain)
            both = await asyncio.gather(c.chat.completions.create(**constrained), c.chat.completions.create(**plain))
            return alone, both

    alone, (json_reply, beside) = asyncio.run(run())
    assert beside.choices[0].message.content == alone.choices[0].message.content
    _check(PERSON, json.loads(json_reply.choices[0].message.content))


# -- errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, param, words",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
         "response_format", "objekt"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
        ({"tools": [TOOLS[0], {"type": "function", "function": {"name": "bad", "parameters": {"type": "strin"}}}],
          "tool_choice": "required"}, "tools[1].function.parameters", "strin"),
        ({"tool_choice": "required"}, "tool_choice", "tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "unique"),
        ({"functions": [{"name": "f"}]}, "functions", "not supported"),
    ],
)  # fmt: skip
def test_bad_tool_and_format_requests_name_the_field(server, extra, param, words):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_tool_messages_are_checked(server):
    def post(messages):
        body = {"model": MODEL, "messages": messages, "max_tokens": 4}
        return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)

    assert post([{"role": "tool", "content": "x"}]).status_code == 400  # no tool_call_id
    assert post([{"role": "user", "content": None}]).status_code == 400
    assert post([{"role": "user", "content": "a", "tool_call_id": "c"}]).status_code == 400

"""The Responses API's pure parts: request parsing, input items as chat messages, the
in-memory store and its bounds (the routes run against a live server in test_api_clients)."""

from __future__ import annotations

import json

import pytest

from ui.errors import APIError
from ui.response_store import ResponseStore, StoredResponse
from ui.responses_schemas import ResponseObject, ResponsesRequest, chat_messages
from ui.schemas import parse_request


def _parse(**body) -> ResponsesRequest:
    return parse_request(json.dumps(body).encode(), ResponsesRequest)


def _error(**body) -> APIError:
    with pytest.raises(APIError) as e:
        _parse(**body)
    return e.value


def test_input_forms_become_one_chat():
    assert chat_messages(_parse(input="Hi").input) == [{"role": "user", "content": "Hi"}]
    req = _parse(
        input=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
            {
                "type": "message",
                "id": "msg_1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}],
            },
            {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "g", "arguments": '{"x": 1}'},
            {"type": "function_call_output", "call_id": "c1", "output": "one"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
        ]
    )
    calls = [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "c2", "type": "function", "function": {"name": "g", "arguments": '{"x": 1}'}},
    ]
    assert chat_messages(req.input) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]
    # A call with no assistant text before it opens an assistant turn of its own.
    lone = _parse(input=[{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}])
    assert chat_messages(lone.input)[0]["role"] == "assistant"


def test_refusals_name_the_field():
    cases = [
        (dict(input=[]), "input"),
        (dict(input=[{"role": "wizard", "content": "x"}]), "input[0].role"),
        (dict(input=[{"type": "reasoning", "summary": []}]), "input[0]"),
        (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]), "input[0].content"),
        (dict(input="x", tools=[{"type": "web_search"}]), "tools[0].type"),
        (dict(input="x", tool_choice="sometimes"), "tool_choice"),
        (dict(input="x", reasoning={"effort": "high"}), "reasoning"),
        (dict(input="x", truncation="auto"), "truncation"),
        (dict(input="x", max_output_tokens=0), "max_output_tokens"),
        (dict(input="x", frobnicate=1), "frobnicate"),
    ]
    for body, param in cases:
        assert _error(**body).param == param, body
    # No-op values of what is not supported pass.
    ok = _parse(input="x", truncation="disabled", reasoning={}, include=[], service_tier="auto", store=False)
    assert ok.store is False
    named = _parse(input="x", tools=[{"type": "function", "name": "f"}], tool_choice={"type": "function", "name": "f"})
    assert named.choice == "f" and named.tools[0].to_tool().name == "f"


def test_text_format_is_a_content_schema():
    assert _parse(input="x").content_schema() is None
    assert _parse(input="x", text={"format": {"type": "text"}}).content_schema() is None
    assert _parse(input="x", text={"format": {"type": "json_object"}}).content_schema() == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "name": "s", "schema": schema, "strict": True}
    assert _parse(input="x", text={"format": fmt}).content_schema() == schema


def _stored(rid: str, text: str) -> StoredResponse:
    response = ResponseObject(
        id=rid,
        created_at=0,
        status="completed",
        model="m",
        instructions=None,
        output=[],
        max_output_tokens=None,
        temperature=1.0,
        top_p=1.0,
        previous_response_id=None,
        store=True,
        metadata={},
        text={"format": {"type": "text"}},
        tools=[],
        tool_choice="auto",
        parallel_tool_calls=True,
    )
    return StoredResponse(response, ({"role": "user", "content": text},))


def test_store_keeps_the_newest_within_its_bounds():
    store = ResponseStore(max_responses=2, max_chars=10_000)
    for i in range(3):
        assert store.put(_stored(f"r{i}", "x"))
    assert store.get("r0") is None and store.get("r2") is not None and len(store) == 2
    assert store.delete("r1") and not store.delete("r1") and len(store) == 1

    small = ResponseStore(max_chars=3 * _stored("a", "x" * 100).chars)
    assert not small.put(_stored("huge", "x" * 10_000))  # alone over the bound: not kept
    for rid in "abcd":
        small.put(_stored(rid, "x" * 100))
    assert [r for r in "abcd" if small.get(r)] == ["b", "c", "d"]

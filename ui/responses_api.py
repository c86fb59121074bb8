"""OpenAI's Responses API: POST /v1/responses, and GET / DELETE /v1/responses/{id} for the
responses kept in memory.

A request becomes one chat through the model's template: the conversation of
`previous_response_id` (if given), then `input`, with `instructions` as a system message in
front. Function tools, tool_choice and text.format go through the same machinery as the chat
route's tools and response_format (ui/tool_calls.py); it runs as one engine request. Streamed,
it is the event sequence OpenAI sends and its SDK checks: response.created,
response.in_progress, then per output item (a message, or a function call) its
output_item.added, content_part.added / output_text.delta... / output_text.done /
content_part.done (function_call_arguments.delta... / .done for a call), output_item.done,
and last response.completed (response.incomplete when max_output_tokens or the context cut it
short, response.failed when the engine fails mid-stream)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from inference.config import SamplingParams
from inference.engine import RequestOutput

from .errors import APIError, to_api_error
from .generation import Fanout, Job, event_stream, unless_disconnected
from .metrics import stream_failed
from .openai_api import _check_model, _engine, _json, _require_ready, chat_setup
from .response_draft import Draft
from .response_store import ResponseStore, StoredResponse
from .responses_schemas import ResponsesRequest, chat_messages
from .schemas import parse_request
from .tool_calls import encode_setup

log = logging.getLogger(__name__)
router = APIRouter()


def _store(request: Request) -> ResponseStore:
    return request.app.state.responses


@router.post("/v1/responses")
async def create_response(request: Request) -> Response:
    req = parse_request(await request.body(), ResponsesRequest)
    engine = _engine(request)
    _check_model(engine, req.model)
    _require_ready(engine)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true.", "stream_options", "invalid_value")
    history: tuple[dict[str, Any], ...] = ()
    if req.previous_response_id is not None:
        prev = _store(request).get(req.previous_response_id)
        if prev is None:
            raise APIError(
                400,
                f"Previous response with id '{req.previous_response_id}' not found: this server keeps the "
                "responses created with store=true in memory (the most recent ones, until it restarts).",
                "previous_response_id",
                "previous_response_not_found",
            )
        history = prev.conversation
    conversation = (*history, *chat_messages(req.input))
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    tools = [t.to_tool() for t in req.tools or []]
    parallel = req.parallel_tool_calls is not False
    messages = [*system, *conversation]
    setup = chat_setup(engine, tools, req.choice, parallel, messages, req.content_schema(), "text.format")
    ids = await asyncio.to_thread(encode_setup, engine, setup)
    budget = req.max_output_tokens or max(1, engine.max_model_len - len(ids))
    engine.check_length(len(ids), budget, "input")
    params = SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        max_tokens=budget,
        grammar=setup.grammar,
    )
    draft = Draft(req, engine.model_name, len(ids), setup.tools)

    def keep() -> None:
        if req.store is not False:
            _store(request).put(StoredResponse(draft.response(), (*conversation, draft.chat_turn())))

    fan = Fanout(engine, [Job(0, ids, params)])
    if not req.stream:
        try:
            await unless_disconnected(request, _drain(fan, draft))
        finally:
            await fan.aclose()
        draft.end()
        keep()
        return _json(draft.response())
    return await event_stream(request, fan, lambda first: _events(fan, first, draft, keep, request))


async def _drain(fan: Fanout, draft: Draft) -> None:
    async for _, out in fan:
        draft.add(out)


async def _events(
    fan: Fanout,
    first: tuple[int, RequestOutput] | None,
    draft: Draft,
    keep: Callable[[], None],
    request: Request,
) -> AsyncIterator[bytes]:
    try:
        for line in draft.start():
            yield line
        item = first
        while item is not None:
            for line in draft.add(item[1]):
                yield line
            item = await fan.next()
        lines = draft.end()
        keep()
        for line in lines:
            yield line
    except Exception as e:  # headers are gone: report in-band, as OpenAI does
        log.warning("response stream %s failed: %s", draft.id, e)
        stream_failed(request.scope)
        yield draft.failed(to_api_error(e))
    finally:
        await fan.aclose()


def _stored(request: Request, response_id: str) -> StoredResponse:
    item = _store(request).get(response_id)
    if item is None:
        raise APIError(404, f"No response with id '{response_id}' is stored here.", "response_id", "not_found")
    return item


@router.get("/v1/responses/{response_id}")
async def retrieve_response(request: Request, response_id: str) -> Response:
    return _json(_stored(request, response_id).response)


@router.delete("/v1/responses/{response_id}")
async def delete_response(request: Request, response_id: str) -> Response:
    _stored(request, response_id)
    _store(request).delete(response_id)
    body = {"id": response_id, "object": "response.deleted", "deleted": True}
    return Response(json.dumps(body), media_type="application/json")

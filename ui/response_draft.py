"""One Responses API response as it is built from the engine's outputs: its output items (a
message, function calls), the response object, and the events that stream it (OpenAI's
sequence, which the SDK checks item by item)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from inference.engine import RequestOutput

from .errors import APIError
from .responses_schemas import (
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    OutputMessage,
    OutputText,
    ResponseError,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    Status,
)
from .tool_calls import ToolPlan
from .tool_parsers import ContentDelta, ToolCallStart, ToolEvent


class Draft:
    """One response as it is built from the engine's outputs, and its stream of events (a
    whole response is built the same way, its events dropped).

    Invariants: `sequence_number` counts the events made so far; `items` are the output
    items in order, only the last of them possibly still open (`_open`)."""

    def __init__(self, req: ResponsesRequest, model: str, input_tokens: int, tools: ToolPlan | None):
        self.req = req
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.model = model
        self.input_tokens = input_tokens
        self.cached_tokens = 0  # of the input, found in the prefix cache
        self.output_tokens = 0
        self.finish_reason: str | None = None
        self.sequence_number = 0
        self.items: list[OutputMessage | FunctionCallItem] = []
        self._open = False
        self._parser = tools.parser() if tools is not None else None
        self._calls: list[int] = []  # output index of each tool call, by the parser's call index

    @property
    def status(self) -> Status:
        return "incomplete" if self.finish_reason == "length" else "completed"

    def response(self, status: Status | None = None, error: ResponseError | None = None) -> ResponseObject:
        """The response now: `status` "in_progress" while streaming, else as it finished."""
        req, status = self.req, status or self.status
        done = status in ("completed", "incomplete")
        fmt = req.text.format if req.text is not None else None
        choice = req.tool_choice
        return ResponseObject(
            id=self.id,
            created_at=self.created_at,
            completed_at=int(time.time()) if done else None,
            status=status,
            error=error,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            model=self.model,
            instructions=req.instructions,
            output=list(self.items) if done else [],
            max_output_tokens=req.max_output_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            previous_response_id=req.previous_response_id,
            store=req.store is not False,
            metadata=req.metadata or {},
            text={"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            tools=[t.model_dump(exclude_none=True) for t in req.tools or []],
            tool_choice=choice.model_dump() if choice is not None and not isinstance(choice, str) else choice or "auto",
            parallel_tool_calls=req.parallel_tool_calls is not False,
            user=req.user,
            usage=ResponseUsage(
                input_tokens=self.input_tokens,
                input_tokens_details=InputTokensDetails(cached_tokens=self.cached_tokens),
                output_tokens=self.output_tokens,
                total_tokens=self.input_tokens + self.output_tokens,
            )
            if done
            else None,
        )

    def chat_turn(self) -> dict[str, Any]:
        """The output as the assistant turn of a chat (what a continuation replays)."""
        text = "".join(i.content[0].text for i in self.items if isinstance(i, OutputMessage))
        calls = [
            {"id": i.call_id, "type": "function", "function": {"name": i.name, "arguments": i.arguments}}
            for i in self.items
            if isinstance(i, FunctionCallItem)
        ]
        return {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}

    # -- events -------------------------------------------------------------------------------
    def event(self, kind: str, **fields: Any) -> bytes:
        body = {"type": kind, "sequence_number": self.sequence_number}
        for k, v in fields.items():
            body[k] = v.model_dump(mode="json") if hasattr(v, "model_dump") else v
        self.sequence_number += 1
        return f"event: {kind}\ndata: {json.dumps(body)}\n\n".encode()

    def start(self) -> list[bytes]:
        running = self.response("in_progress")
        return [self.event("response.created", response=running), self.event("response.in_progress", response=running)]

    def add(self, out: RequestOutput) -> list[bytes]:
        """Take one engine output; returns the events it makes."""
        self.output_tokens = out.num_output_tokens
        self.cached_tokens = out.num_cached_tokens
        if out.finished:
            self.finish_reason = out.finish_reason
        if self._parser is None:
            events: list[ToolEvent] = [ContentDelta(out.text)] if out.text else []
        else:
            events = self._parser.feed(out.text) + (self._parser.finish() if out.finished else [])
        return [line for e in events for line in self._apply(e)]

    def end(self) -> list[bytes]:
        lines = [] if self.items else self._open_message()  # the output always has an item
        lines += self._close(self.status)
        final = self.response()
        return [*lines, self.event(f"response.{final.status}", response=final)]

    def failed(self, err: APIError) -> bytes:
        code = "server_error" if err.status >= 500 else (err.code or "invalid_request")
        failed = self.response("failed", ResponseError(code=code, message=err.message))
        return self.event("response.failed", response=failed)

    def _apply(self, e: ToolEvent) -> list[bytes]:
        if isinstance(e, ContentDelta):
            opened = self._open and isinstance(self.items[-1], OutputMessage)
            lines = [] if opened else self._close("completed") + self._open_message()
            msg = self.items[-1]
            assert isinstance(msg, OutputMessage)
            msg.content[0].text += e.text
            where = {"item_id": msg.id, "output_index": len(self.items) - 1, "content_index": 0}
            return [*lines, self.event("response.output_text.delta", **where, delta=e.text, logprobs=[])]
        if isinstance(e, ToolCallStart):
            lines = self._close("completed")
            call = FunctionCallItem(
                id=f"fc_{uuid.uuid4().hex}", call_id=e.id, name=e.name, arguments="", status="in_progress"
            )
            self.items.append(call)
            self._calls.append(len(self.items) - 1)
            self._open = True
            return [*lines, self.event("response.output_item.added", output_index=len(self.items) - 1, item=call)]
        index = self._calls[e.index]
        call = self.items[index]
        assert isinstance(call, FunctionCallItem)
        call.arguments += e.text
        return [self.event("response.function_call_arguments.delta", item_id=call.id, output_index=index, delta=e.text)]

    def _open_message(self) -> list[bytes]:
        msg = OutputMessage(id=f"msg_{uuid.uuid4().hex}", status="in_progress", content=[OutputText(text="")])
        self.items.append(msg)
        self._open = True
        index = len(self.items) - 1
        return [
            self.event("response.output_item.added", output_index=index, item=msg.model_copy(update={"content": []})),
            self.event(
                "response.content_part.added", item_id=msg.id, output_index=index, content_index=0, part=msg.content[0]
            ),
        ]

    def _close(self, status: Status) -> list[bytes]:
        if not self._open:
            return []
        self._open = False
        item, index = self.items[-1], len(self.items) - 1
        item.status = status
        if isinstance(item, OutputMessage):
            part, where = item.content[0], {"item_id": item.id, "output_index": index, "content_index": 0}
            lines = [
                self.event("response.output_text.done", **where, text=part.text, logprobs=[]),
                self.event("response.content_part.done", **where, part=part),
            ]
        else:
            lines = [
                self.event(
                    "response.function_call_arguments.done",
                    item_id=item.id,
                    output_index=index,
                    arguments=item.arguments,
                )
            ]
        return [*lines, self.event("response.output_item.done", output_index=index, item=item)]

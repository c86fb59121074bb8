"""Model output -> tool calls, incrementally: one parser per template family.

A parser is fed the text of one choice as it streams and returns events: content text, the
start of a tool call (its id and function name), and fragments of its arguments. A whole
response is parsed by feeding all of its text at once, so streamed deltas always reassemble
to exactly what the non-streaming response holds: the events depend only on the text, never
on how it was chunked. Each call's `arguments` is the raw JSON text the model wrote for them
(OpenAI's `arguments` is a string too); a model that wrote them as a JSON string gets that
string's value.

Families:
- Hermes (Qwen2/2.5, Hermes 2/3): text, then `<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>` blocks.
- JSON (Llama 3.x's JSON form, and the generic fallback): the whole reply is one call object
  `{"name": ..., "parameters"|"arguments": {...}}`, or several separated by `;`; a reply
  that does not start with `{` is plain content."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_ARG_KEYS = ("arguments", "parameters")
# A call object's head when it names the function first: from here its arguments stream.
_HEAD = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*')


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    index: int  # of the call in this choice's tool_calls
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolArgsDelta:
    index: int
    text: str


ToolEvent = ContentDelta | ToolCallStart | ToolArgsDelta


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def collect(events: list[ToolEvent]) -> tuple[str | None, list[ToolCall]]:
    """Events -> (content or None if there was none, tool calls)."""
    content: list[str] = []
    calls: list[ToolCall] = []
    for ev in events:
        if isinstance(ev, ContentDelta):
            content.append(ev.text)
        elif isinstance(ev, ToolCallStart):
            calls.append(ToolCall(ev.id, ev.name, ""))
        else:
            calls[ev.index].arguments += ev.text
    text = "".join(content)
    return (text or None), calls


class _JsonScan:
    """Finds where the JSON object or array opening at `start` closes, scanning each char of
    a growing text once (strings and escapes respected)."""

    def __init__(self, start: int):
        self.pos, self.depth, self.in_str, self.esc = start, 0, False, False
        self.end: int | None = None  # just past the closing bracket, once seen

    def advance(self, text: str) -> int | None:
        while self.end is None and self.pos < len(text):
            c = text[self.pos]
            self.pos += 1
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == '"':
                    self.in_str = False
            elif c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.end = self.pos
        return self.end


class _CallObject:
    """One `{...}` call object being streamed. Its arguments stream as they arrive once the
    head (`{"name": "<known tool>", "arguments": {`) is complete; otherwise the whole object
    is judged when it closes."""

    def __init__(self, names: frozenset[str]):
        self.text = ""
        self.names = names
        self.started = False  # a ToolCallStart was emitted for it
        self.args_start = 0  # where the streamed arguments begin in `text`
        self.args_sent = 0  # chars of the arguments emitted so far
        self.end: int | None = None  # just past the closing brace, once seen
        self._scan = _JsonScan(0)
        self._args: _JsonScan | None = None

    def feed(self, text: str, index: int, events: list[ToolEvent]) -> None:
        self.text += text
        if not self.started:
            m = _HEAD.match(self.text)
            # Also wait for the first char of the value: the head's trailing \s* must not
            # depend on where a chunk ended.
            if m and m.end() < len(self.text) and self.text[m.end()] == "{":
                name = json.loads(m.group(1))
                if name in self.names:
                    self.started, self.args_start = True, m.end()
                    self._args = _JsonScan(m.end())
                    events.append(ToolCallStart(index, new_call_id(), name))
        self.end = self._scan.advance(self.text)
        if self._args is not None:
            self._args.advance(self.text)
            upto = self._args.pos  # its end once closed, else all the text so far
            if upto - self.args_start > self.args_sent:
                events.append(ToolArgsDelta(index, self.text[self.args_start + self.args_sent : upto]))
                self.args_sent = upto - self.args_start

    def close(self, index: int, events: list[ToolEvent]) -> bool:
        """At the object's end (or the text's): emit a call judged whole if it is one; False
        if the object is no tool call (its text is then content)."""
        if self.started:
            return True
        try:
            obj = json.loads(self.text[: self.end]) if self.end is not None else None
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in self.names:
            return False
        key = next((k for k in _ARG_KEYS if k in obj), None)
        args = obj.get(key, {}) if key else {}
        events.append(ToolCallStart(index, new_call_id(), obj["name"]))
        events.append(ToolArgsDelta(index, args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))
        return True


class ToolCallParser:
    """Feed text, get events; `finish()` once at the end. `max_calls` (1 when the request set
    parallel_tool_calls false) caps the calls returned: text after the last allowed call is
    dropped.

    Invariants: `_buf` holds the text received but not yet turned into events; the events
    returned so far depend only on the text fed, not on how it was split."""

    def __init__(self, names: list[str] | frozenset[str], max_calls: int | None = None):
        self.names = frozenset(names)
        self.max_calls = max_calls
        self.num_calls = 0
        self._buf = ""
        self._done = False
        self._state = "start"
        self._obj: _CallObject | None = None

    def feed(self, text: str) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        if not self._done:
            self._buf += text
            while not self._done and self._advance(events, final=False):
                pass
        return events

    def finish(self) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        if not self._done:
            while not self._done and self._advance(events, final=True):
                pass
            self._done = True
        return events

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A whole reply -> (content, tool calls): the same as streaming it."""
        return collect(self.feed(text) + self.finish())

    def _advance(self, events: list[ToolEvent], final: bool) -> bool:
        """Handle the current state; True to go on, False when it needs more text."""
        raise NotImplementedError

    def _object(self, events: list[ToolEvent], final: bool, not_a_call: str) -> bool:
        """The `object` state: feed the call object; at its end, state `after` if it was a
        call, else its text (after `not_a_call`) is content and the state is `text`."""
        obj = self._obj
        assert obj is not None
        obj.feed(self._buf, self.num_calls, events)
        self._buf = ""
        if obj.end is None and not final:
            return False
        if obj.end is not None:
            self._buf, obj.text = obj.text[obj.end :], obj.text[: obj.end]
        if obj.close(self.num_calls, events):
            self.num_calls += 1
            self._state = "after"
            self._done = self._full()
        else:
            _content(not_a_call + obj.text, events)
            self._state = "text"
        self._obj = None
        return not final or bool(self._buf)

    def _full(self) -> bool:
        return self.max_calls is not None and self.num_calls >= self.max_calls


def _content(text: str, events: list[ToolEvent]) -> None:
    if text:
        events.append(ContentDelta(text))


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class HermesParser(ToolCallParser):
    """`<tool_call>{json}</tool_call>` blocks among content (Qwen2, Hermes). Whitespace
    around blocks is not content; a block that holds no call is content, tags included."""

    def __init__(self, names: list[str] | frozenset[str], max_calls: int | None = None):
        super().__init__(names, max_calls)
        self._state = "text"
        self._opened = ""  # the current block's text before its object (the tag, whitespace)

    def _advance(self, events: list[ToolEvent], final: bool) -> bool:
        buf = self._buf
        if self._state == "text":
            at = buf.find(TOOL_CALL_OPEN)
            if at < 0:
                # Hold back a possible start of the tag, and trailing whitespace (dropped if
                # a block follows, content otherwise).
                keep = 0
                if not final:
                    head = buf[: len(buf) - _partial_suffix(buf, TOOL_CALL_OPEN)]
                    keep = len(buf) - len(head.rstrip())
                _content(buf[: len(buf) - keep], events)
                self._buf = buf[len(buf) - keep :]
                return False
            _content(buf[:at].rstrip(), events)
            self._buf, self._opened, self._state = buf[at + len(TOOL_CALL_OPEN) :], TOOL_CALL_OPEN, "open"
            return True
        if self._state == "open":
            rest = buf.lstrip()
            if not rest and not final:
                return False
            if rest.startswith("{"):
                self._opened += buf[: len(buf) - len(rest)]
                self._buf, self._obj, self._state = rest, _CallObject(self.names), "object"
            else:
                _content(self._opened, events)
                self._state = "text"
            return bool(rest)
        if self._state == "object":
            return self._object(events, final, self._opened)
        if self._state == "after":  # just after a call object: its closing tag
            rest = buf.lstrip()
            if rest.startswith(TOOL_CALL_CLOSE):
                rest = rest[len(TOOL_CALL_CLOSE) :]
            elif TOOL_CALL_CLOSE.startswith(rest) and not final:
                return False  # the closing tag may still come
            self._buf, self._state = rest.lstrip(), "between"
            return True
        # between blocks: whitespace is dropped; anything else is content or the next block
        rest = buf.lstrip()
        if not rest:
            self._buf = ""
            return False
        self._buf, self._state = rest, "text"
        return True


class JsonCallParser(ToolCallParser):
    """A reply that is one call object `{"name": ..., "arguments"|"parameters": {...}}`, or
    several separated by `;` (Llama 3's JSON form; the generic fallback). A reply that does
    not start with `{`, or whose object is no call, is content."""

    def _advance(self, events: list[ToolEvent], final: bool) -> bool:
        buf = self._buf
        if self._state == "text":
            _content(buf, events)
            self._buf = ""
            return False
        if self._state == "object":
            return self._object(events, final, "")
        rest = buf.lstrip()
        if self._state == "after":
            rest = rest.lstrip(";,").lstrip()
        if not rest:
            if final and self._state == "start":
                _content(buf, events)
                self._buf = ""
            return False
        if rest.startswith("{"):
            self._buf, self._obj, self._state = rest, _CallObject(self.names), "object"
        else:
            # Leading whitespace of a plain reply stays; text after calls loses its separator.
            self._buf, self._state = (buf if self._state == "start" else rest), "text"
        return True

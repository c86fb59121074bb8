"""The responses this server keeps in memory (`store`), for `previous_response_id` and GET.

Nothing survives a restart; the oldest are dropped first when either bound is reached."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .responses_schemas import ResponseObject

MAX_RESPONSES = 1000
MAX_CHARS = 64 << 20  # text held across all kept responses and conversations


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A finished response and the conversation it ends: every turn of its input, those of
    the responses it continues, and its own output, as chat messages. Instructions are not
    part of it: OpenAI does not carry them over to a continuation."""

    response: ResponseObject
    conversation: tuple[dict[str, Any], ...]  # chat messages (tool calls and results included)
    chars: int = field(init=False)  # what it holds, as JSON text

    def __post_init__(self) -> None:
        object.__setattr__(self, "chars", len(json.dumps(self.conversation)) + len(self.response.model_dump_json()))


class ResponseStore:
    """Invariants: holds at most `max_responses` responses and `max_chars` characters (a
    single larger one is not kept), oldest first."""

    def __init__(self, max_responses: int = MAX_RESPONSES, max_chars: int = MAX_CHARS):
        self.max_responses = max_responses
        self.max_chars = max_chars
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()  # the event loop is the only writer today; cheap insurance

    def put(self, item: StoredResponse) -> bool:
        """Keep `item`; False when it alone is over the character bound."""
        size = item.chars
        if size > self.max_chars:
            return False
        with self._lock:
            self._drop(item.response.id)
            self._items[item.response.id] = item
            self._chars += size
            while len(self._items) > self.max_responses or self._chars > self.max_chars:
                self._drop(next(iter(self._items)))
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._drop(response_id)

    def _drop(self, response_id: str) -> bool:
        old = self._items.pop(response_id, None)
        if old is None:
            return False
        self._chars -= old.chars
        return True

    def __len__(self) -> int:
        return len(self._items)

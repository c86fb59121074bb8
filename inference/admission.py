"""Admission control: how much one client may ask for, and how much may wait at once.

A request (one API call: its prompts times `n` choices, or one chat reply) is admitted whole
or refused whole, before anything is queued. Refusals are typed: `QueueFull` means "later"
(the HTTP layer answers 429 with a Retry-After), `RequestTooLarge` means "never like this"
(429 too, as OpenAI answers a request over a token limit, but not worth retrying)."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from .errors import InferenceError, InvalidParameter

# Retry-After bounds (seconds): at least one, and never so long that a client gives up.
_RETRY_MIN_S = 1
_RETRY_MAX_S = 60
# Weight of the newest request duration in the running mean behind Retry-After.
_EMA_WEIGHT = 0.2


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """`max_queue`: engine requests (choices) that may wait beyond a full batch;
    `max_n`: choices in one request; `max_request_tokens`: prompt + max_tokens summed over
    a request's choices; `unavailable_wait_s`: how long a queued request waits for a lost
    stage to be replaced before it fails."""

    max_queue: int = 64
    max_n: int = 16
    max_request_tokens: int = 65536
    unavailable_wait_s: float = 60.0

    def __post_init__(self) -> None:
        for name, least in (("max_queue", 0), ("max_n", 1), ("max_request_tokens", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise InvalidParameter(name, f"must be an integer >= {least}, got {v!r}")
        if not (math.isfinite(self.unavailable_wait_s) and self.unavailable_wait_s >= 0):
            raise InvalidParameter("unavailable_wait_s", f"must be a number >= 0, got {self.unavailable_wait_s!r}")


class QueueFull(InferenceError):
    """Too many requests wait already; `retry_after` is a guess, in whole seconds, of when
    there will be room."""

    def __init__(self, waiting: int, limit: int, retry_after: int):
        super().__init__(f"the server is busy: {waiting} requests are queued (limit {limit}); retry in {retry_after} s")
        self.retry_after = retry_after


class RequestTooLarge(InferenceError):
    """One request asks for more than any single request may (`param` names the field to lower)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


class Admission:
    """The gate in front of the engine's queue.

    Invariant: `in_flight` counts the engine requests admitted and not yet ended (finished,
    failed or aborted), so `in_flight - max_batch` of them, at most, wait for a slot; a
    request is admitted only if that stays within `max_queue`, or if nothing is in flight
    (an idle server takes any request within the per-request limits). Thread-safe:
    requests are admitted on the event loop and may end anywhere."""

    def __init__(self, limits: AdmissionLimits):
        self.limits = limits
        self._lock = threading.Lock()
        self._in_flight = 0
        self._mean_s: float | None = None  # running mean of how long a request takes

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def check(self, requests: list[tuple[int, int]]) -> None:
        """RequestTooLarge unless a request of these (prompt tokens, max_tokens) choices is
        within the per-request limits."""
        lim = self.limits
        if len(requests) > lim.max_n:
            raise RequestTooLarge(
                "n",
                f"this request asks for {len(requests)} choices; this server allows at most {lim.max_n} per request",
            )
        total = sum(p + m for p, m in requests)
        if total > lim.max_request_tokens:
            raise RequestTooLarge(
                "max_tokens",
                f"this request asks for {total} tokens (prompt + max_tokens, times its choices); this server "
                f"allows at most {lim.max_request_tokens} per request: lower max_tokens or n",
            )

    def admit(self, count: int, max_batch: int) -> None:
        """Count `count` more engine requests in flight, or raise QueueFull."""
        with self._lock:
            waiting = max(0, self._in_flight + count - max_batch)
            if self._in_flight and waiting > self.limits.max_queue:
                raise QueueFull(
                    max(0, self._in_flight - max_batch), self.limits.max_queue, self._retry_after(max_batch)
                )
            self._in_flight += count

    def release(self, seconds: float | None = None) -> None:
        """One engine request ended; `seconds` (from admission to its last token) if it finished."""
        with self._lock:
            self._in_flight -= 1
            if seconds is not None:
                m = self._mean_s
                self._mean_s = seconds if m is None else m + _EMA_WEIGHT * (seconds - m)

    def _retry_after(self, max_batch: int) -> int:
        # The queue drains a batch at a time, each taking about one request's duration.
        waves = max(1, self._in_flight - max_batch) / max_batch
        guess = waves * (self._mean_s if self._mean_s is not None else _RETRY_MIN_S)
        return int(min(_RETRY_MAX_S, max(_RETRY_MIN_S, math.ceil(guess))))

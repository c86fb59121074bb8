"""Who may do what: the API key check, and a brake on guessing it at the login form.

With `--api-key`, the OpenAI routes need `Authorization: Bearer <key>`, /api/status shows the
cluster's addresses only to a caller who sends it, and the web page sits behind Gradio's login
form, whose password is the key. `LoginRateLimit` keeps that form from being a way to guess it."""

from __future__ import annotations

import hmac
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

LOGIN_PATHS = ("/login", "/login/")  # Gradio's form posts here (the page is mounted at /)
_SWEEP_AT = 1024  # addresses with recent failures before a full sweep of expired ones


def bearer_ok(headers: Iterable[tuple[bytes, bytes]], key: str) -> bool:
    """Whether raw ASGI `headers` carry `Authorization: Bearer <key>`."""
    header = next((v for k, v in headers if k == b"authorization"), b"")
    scheme, _, token = header.partition(b" ")
    # compare_digest: the time taken must not tell how much of the key was right.
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode())


class LoginRateLimit:
    """After `max_failures` failed logins from one client address within `window_s` seconds,
    every login attempt from it answers 429 (with Retry-After) until the oldest of those
    failures is older than the window: at most `max_failures` guesses a window per address.

    Invariant: `_failures` holds, per address, the times of its failures still inside the
    window (oldest first); addresses with none are dropped, so memory stays bounded by the
    addresses that failed in the last window."""

    def __init__(
        self,
        app: ASGIApp,
        max_failures: int = 5,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.app = app
        self.max_failures = max_failures
        self.window_s = window_s
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in LOGIN_PATHS:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = client[0] if client else "unknown"
        if (wait := self._blocked_for(address)) > 0:
            await _too_many(send, wait)
            return
        status = 500

        async def send_seen(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, send_seen)
        if status in (400, 401, 403):  # Gradio answers a wrong password with 400
            self._record(address)

    def _prune(self, addresses: Iterable[str], now: float) -> None:
        for address in list(addresses):
            times = self._failures.get(address)
            while times and now - times[0] >= self.window_s:
                times.popleft()
            if times is not None and not times:
                del self._failures[address]

    def _blocked_for(self, address: str) -> float:
        """Seconds until `address` may try again (0: now)."""
        now = self._clock()
        # Sweep everyone now and then, so addresses that stopped trying are forgotten.
        self._prune(self._failures if len(self._failures) > _SWEEP_AT else (address,), now)
        times = self._failures.get(address)
        if times is None or len(times) < self.max_failures:
            return 0.0
        return times[-self.max_failures] + self.window_s - now

    def _record(self, address: str) -> None:
        times = self._failures.setdefault(address, deque())
        times.append(self._clock())
        if len(times) == self.max_failures:
            log.warning(
                "%d failed logins from %s within %.0f s: refusing its logins for a while",
                len(times),
                address,
                self.window_s,
            )


async def _too_many(send: Send, wait: float) -> None:
    seconds = max(1, math.ceil(wait))
    body = json.dumps({"detail": f"Too many failed logins; try again in {seconds} s."}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 429,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(seconds).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})

"""Running a request's choices on the AsyncEngine, and never outliving the client.

A request with n choices (or several prompts) becomes several engine requests; `Fanout`
runs them concurrently and merges their outputs. Every engine request it starts is aborted
(its KV blocks freed within one engine step) as soon as the HTTP request ends early: the
client disconnects, a sibling choice fails, or the server shuts down."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from inference.async_engine import AsyncEngine, RequestStream
from inference.config import SamplingParams
from inference.engine import RequestOutput
from inference.multimodal import ImageInputs

from .errors import ClientDisconnected

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(slots=True, frozen=True)
class Job:
    """One choice: `index` is its place in the response's `choices`."""

    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    images: ImageInputs | None = None  # the prompt's pictures (every choice shares them)


class Fanout:
    """Runs one engine request per job and yields `(index, output)` in arrival order.

    The jobs are submitted together when it is built, so admission control takes or refuses
    the whole request (the constructor raises, and nothing was queued).

    Invariants: `_live` counts jobs that have not yet delivered a finished output; after
    `aclose()` no task is left and every unfinished engine request has been aborted."""

    def __init__(self, engine: AsyncEngine, jobs: list[Job]):
        self._queue: asyncio.Queue[tuple[int, RequestOutput | Exception]] = asyncio.Queue()
        images = jobs[0].images if jobs else None
        self._streams = engine.submit([(job.prompt_token_ids, job.params) for job in jobs], images)
        self._live = len(jobs)
        self._tasks = [
            asyncio.create_task(self._pump(job.index, stream), name=f"choice-{job.index}")
            for job, stream in zip(jobs, self._streams)
        ]

    async def _pump(self, index: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                self._queue.put_nowait((index, out))
        except Exception as e:  # handed to the consumer, which raises it in the request
            self._queue.put_nowait((index, e))
        finally:
            stream.close()

    async def next(self) -> tuple[int, RequestOutput] | None:
        """The next output of any choice; None once every choice has finished."""
        if self._live == 0:
            return None
        index, item = await self._queue.get()
        if isinstance(item, Exception):
            raise item
        if item.finished:
            self._live -= 1
        return index, item

    def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while (item := await self.next()) is not None:
            yield item

    async def aclose(self) -> None:
        # Closing a stream posts its abort at once (also for a task that never started), so
        # every abort is posted even if this coroutine is itself being cancelled; the
        # shielded wait only lets the tasks finish.
        for stream in self._streams:
            stream.close()
        for task in self._tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def _wait_for_disconnect(receive: Receive) -> None:
    # The body has been read, so the next message the server has for us is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client goes away first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator.

    Starlette stops iterating when the client disconnects (it cancels the send loop) but
    leaves the generator suspended at its `yield` until garbage collection; closing it here
    runs its `finally` at once, which aborts the engine requests behind the stream."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                with anyio.CancelScope(shield=True):
                    await close()


async def event_stream(
    request: Request, fan: Fanout, events: Callable[[tuple[int, RequestOutput] | None], AsyncIterator[str | bytes]]
) -> ClosingStreamingResponse:
    """A server-sent-event response of `events(first output)`. The first output is awaited
    before the headers go out, so an error the engine raises when it admits the request is
    still a proper HTTP error."""
    try:
        first = await unless_disconnected(request, fan.next())
    except BaseException:
        await fan.aclose()
        raise
    return ClosingStreamingResponse(
        events(first), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )

"""One long-lived thread per process runs torch's parallel work; one-off torch work off the
event loop (loading a model, preparing pictures) runs in a thread that exits when done.

Why: libgomp, torch's OpenMP on Linux, keeps a pool of worker threads for every thread that
ever ran a parallel region, for as long as that thread lives. Once a process holds more of
them than it has CPUs, libgomp stops spinning between parallel regions ("throttled") and
every region waits for a sleeping thread to wake. A quantized decode step opens ~125 regions:
on 2 cores the same model decoded 25-30% slower from a second thread than from the first
(88 against 119 tok/s) until the first thread had exited. `asyncio.to_thread`'s threads live
on, so torch work must not go there."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def in_fresh_thread(fn: Callable[..., T], *args, name: str = "torch-once") -> T:
    """`fn(*args)` in a new thread that ends with it (and takes its OpenMP pool along)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():  # the caller was cancelled meanwhile
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as e:  # handed to the awaiting task, raised there
            loop.call_soon_threadsafe(settle, None, e)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await done

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
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def omp_wait_defaults() -> None:
    """How OpenMP threads wait between parallel regions, for a server process (the master and
    every worker); call it before torch loads, since libgomp reads the environment once.
    Threads that spin without end make a CPU-shared server crawl (3-6x slower decoding
    measured on a busy 2-core machine), but a decode step opens ~125 parallel regions (each
    quantized matmul is one), and waking a sleeping thread for each cost 4-5 ms of a 10 ms
    int4 step. So they spin ~0.1 ms (libgomp counts ~100k spins a millisecond), which covers
    the gaps inside a step, then sleep. Either variable set by the user wins."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # runtimes other than libgomp
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # libgomp (torch's on Linux): overrides PASSIVE's 0


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

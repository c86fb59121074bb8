"""The model thread behind AsyncEngine: it alone steps the Engine.

It sleeps on a `threading.Event` when there is nothing to do (no busy polling), takes
requests and aborts from a thread-safe inbox, and hands outputs back to each request's
`asyncio.Queue` on the event loop the request came from.

While the engine is unavailable (a stage died, the cluster re-plans) nothing new starts:
running sequences finish or fail, and queued ones wait for the next runner, each up to
`unavailable_wait_s` after it arrived or the outage began, whichever is later."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .config import SamplingParams
from .engine import Engine
from .errors import InferenceError, InvalidParameter, StageFailure
from .metrics import TokenMetrics
from .multimodal import ImageInputs
from .runner import Runner

log = logging.getLogger(__name__)


class EngineDead(InferenceError):
    """The model loop stopped on an unexpected error; requests fail until restart."""


class EngineNotReady(InferenceError):
    """The model is still loading (or waiting for its workers)."""


class EngineUnavailable(EngineNotReady):
    """A queued request waited longer than allowed for a lost stage to be replaced."""


@dataclass(slots=True)
class Pending:
    """One engine request between the event loop and the model thread."""

    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    group: int  # the client request it is one choice of
    t_submit: float  # time.monotonic() at admission
    seq_id: int | None = None  # set by the model thread once added
    t_last: float | None = None  # time.monotonic() at the end of the step of its latest token
    closed: bool = False  # its stream was closed: an add still in the inbox is dropped
    images: ImageInputs | None = None  # the prompt's pictures (a vision model)


class Availability:
    """Whether the engine can serve, and the runner waiting to replace its own: the cluster's
    levers, set from the event loop and read by the model thread, all under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reason: str | None = None
        self._since = 0.0  # time.monotonic() when it became unavailable
        self._swap: Runner | None = None

    @property
    def reason(self) -> str | None:
        with self._lock:
            return self._reason

    @property
    def since(self) -> float:
        with self._lock:
            return self._since

    @property
    def swap_pending(self) -> bool:
        with self._lock:
            return self._swap is not None

    def set_unavailable(self, reason: str | None) -> None:
        with self._lock:
            if self._reason is None and reason is not None:
                self._since = time.monotonic()
            self._reason = reason

    def offer(self, runner: Runner) -> Runner | None:
        """Queue `runner` for installation; returns the waiting one it supersedes."""
        with self._lock:
            superseded, self._swap = self._swap, runner
        return superseded

    def take(self) -> Runner | None:
        """The waiting runner, now being installed: the engine is available again."""
        with self._lock:
            runner, self._swap = self._swap, None
            if runner is not None:
                self._reason = None
        return runner


class ModelLoop:
    """Steps one Engine in its own thread.

    Invariants: only this thread touches the Engine's mutable state (scheduler, KV, runner);
    every added request is in `_streams` until it finishes, fails or is aborted, and gets
    exactly one final item (its finished output or an exception); a runner is installed only
    when no sequence runs, so no KV survives a runner change."""

    def __init__(
        self,
        engine: Engine,
        availability: Availability,
        unavailable_wait_s: float,
        retire: Callable[[Runner], None],
        on_stage_failure: Callable[[StageFailure], None] | None,
        metrics: TokenMetrics,
    ):
        self.engine = engine
        self.availability = availability
        self.unavailable_wait_s = unavailable_wait_s
        self._retire = retire
        self._on_stage_failure = on_stage_failure
        self.metrics = metrics
        self._inbox: deque[tuple[str, Pending]] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._streams: dict[int, Pending] = {}
        self.error: BaseException | None = None
        self.finished = 0
        self.generated_tokens = 0
        self._thread = threading.Thread(target=self._run, name="model-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def stopping(self) -> bool:
        """Set by `stop()` or a crash: whatever is posted from now on may never be read."""
        return self._stop or self.error is not None

    def stop(self, timeout: float) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    def post(self, kind: str, req: Pending) -> None:
        """Hand the model thread an "add" or an "abort" (any thread)."""
        self._inbox.append((kind, req))
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    # -- the thread ----------------------------------------------------------------------
    def _measure(self, req: Pending, num_tokens: int, now: float) -> None:
        if req.t_last is None:
            self.metrics.first_tokens(now - req.t_submit, num_tokens, len(req.prompt))
        else:
            self.metrics.next_tokens(now - req.t_last, num_tokens)
        req.t_last = now

    def _deliver(self, req: Pending, item) -> None:
        req.loop.call_soon_threadsafe(req.queue.put_nowait, item)

    @staticmethod
    def _deliver_step(items: list[tuple[Pending, object]]) -> None:
        """A step's outputs, with one wake-up of each event loop for all of them: every
        call_soon_threadsafe writes to the loop's self-pipe, and 16 streams made 16 of those
        (and their wake-ups) a step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for req, item in items:
            by_loop.setdefault(req.loop, []).append((req.queue, item))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _drain_inbox(self) -> None:
        for _ in range(len(self._inbox)):
            kind, req = self._inbox.popleft()
            if kind == "add" and req.closed:
                continue  # abandoned before it reached the engine
            if kind == "add" and self.availability.swap_pending:
                self._inbox.append((kind, req))  # admitted after the swap
                continue
            if kind == "add":
                try:
                    req.seq_id = self.engine.add_request(req.prompt, req.params, req.group, req.images)
                    self._streams[req.seq_id] = req
                except InferenceError as e:
                    self._deliver(req, e)
                except Exception as e:  # one bad request must not stop the loop for everyone
                    log.exception("request rejected by the engine")
                    self._deliver(req, InvalidParameter("request", f"the engine rejected it: {e}"))
            elif req.seq_id is not None and self._streams.pop(req.seq_id, None) is not None:
                self.engine.abort(req.seq_id)

    def _fail_in_flight(self, e: StageFailure) -> None:
        """A stage died mid-step, and with it the KV of every running sequence. A request
        that already streamed tokens ends with an error now; one that has produced nothing
        goes back to the queue and waits for the replacement stage."""
        self.availability.set_unavailable(f"a pipeline stage failed ({e}); waiting for the cluster to recover")
        # Tell the cluster first: it starts looking for a replacement before anyone hears of it.
        if self._on_stage_failure is not None:
            try:
                self._on_stage_failure(e)
            except Exception:
                log.exception("on_stage_failure failed")
        sched = self.engine.scheduler
        started = [s for s in sched.running + sched.waiting if s.output_token_ids]
        log.error("pipeline step failed: %s; failing %d requests", e, len(started))
        for seq in started:
            self.engine.abort(seq.seq_id)
            if (req := self._streams.pop(seq.seq_id, None)) is not None:
                self._deliver(req, StageFailure(str(e)))
        sched.requeue_running()
        if sched.num_waiting:
            log.info(
                "%d queued requests wait up to %.0f s for the cluster to recover",
                sched.num_waiting,
                self.unavailable_wait_s,
            )

    def _install_swap(self) -> None:
        runner = self.availability.take()
        assert runner is not None  # only the model thread takes a waiting runner
        old, self.engine.runner = self.engine.runner, runner
        # The cached prefixes' KV lives in the old runner (or its stages): the new one has none.
        self.engine.kv.reset_prefix_cache()
        self._retire(old)
        log.info("engine runner swapped: %s", type(runner).__name__)

    def _expire_waiting(self, reason: str) -> float | None:
        """Fail the queued requests that waited too long for the engine to come back;
        returns the seconds until the next one is due (None: nobody waits)."""
        now, wait, since = time.monotonic(), self.unavailable_wait_s, self.availability.since
        next_due: float | None = None
        for seq in self.engine.scheduler.waiting:
            req = self._streams.get(seq.seq_id)
            due = max(req.t_submit if req else now, since) + wait
            if due > now:
                next_due = due - now if next_due is None else min(next_due, due - now)
                continue
            self.engine.abort(seq.seq_id)
            if req is not None:
                del self._streams[seq.seq_id]
                why = f"the server could not serve this request within {wait:.0f} s: {reason}"
                self._deliver(req, EngineUnavailable(why))
        return next_due

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop:
                self._drain_inbox()
                # Only running sequences hold KV: with none, a new runner starts from a clean pool.
                if self.availability.swap_pending and engine.scheduler.num_running == 0:
                    self._install_swap()
                    continue
                reason = self.availability.reason
                if reason is not None and engine.scheduler.num_running == 0:
                    # Nothing can run: queued requests wait for a new runner, up to the bound.
                    self._wake.wait(self._expire_waiting(reason))
                    self._wake.clear()
                    continue
                if not engine.has_work:
                    self._wake.wait()
                    self._wake.clear()
                    continue
                try:
                    # While unavailable, running sequences finish (or fail) but none start.
                    outputs = engine.step(admit=reason is None)
                except StageFailure as e:
                    self._fail_in_flight(e)
                    continue
                now = time.monotonic()
                deliveries: list[tuple[Pending, object]] = []
                for out in outputs:
                    req = self._streams.get(out.seq_id)
                    self.generated_tokens += len(out.token_ids)
                    if out.finished:
                        self._streams.pop(out.seq_id, None)
                        self.finished += 1
                    if req is not None:
                        if out.token_ids:  # measured before delivery: a client never sees a token uncounted
                            self._measure(req, len(out.token_ids), now)
                        deliveries.append((req, out))
                self._deliver_step(deliveries)
        except BaseException as e:  # keep serving errors, not hangs, to every waiting client
            log.exception("model loop crashed")
            self.error = e
        # Nobody may wait forever: fail what is still in flight (crash or shutdown).
        why = f"the model loop stopped: {self.error}" if self.error else "the server is shutting down"
        for req in list(self._streams.values()) + [r for _, r in self._inbox]:
            self._deliver(req, EngineDead(why))
        self._streams.clear()


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)

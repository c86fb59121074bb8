"""AsyncEngine: async streams of text deltas over the synchronous Engine.

The model loop runs in its own thread and sleeps on a `threading.Event` when there is
nothing to do (no busy polling). The event loop hands it requests and aborts through a
thread-safe inbox; outputs travel back through each request's `asyncio.Queue`.
Invariant: only the model thread touches the Engine after `start()`."""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .config import SamplingParams
from .engine import Engine, RequestOutput
from .errors import InferenceError, InvalidParameter, StageFailure

log = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineStats:
    model: str
    waiting: int
    running: int
    kv_blocks_used: int
    kv_blocks_free: int
    kv_blocks_total: int
    aborted: int
    finished: int
    generated_tokens: int
    max_model_len: int
    ready: bool


class EngineDead(InferenceError):
    """The model loop stopped on an unexpected error; requests fail until restart."""


class EngineNotReady(InferenceError):
    """The model is still loading (or waiting for its workers)."""


@dataclass(slots=True)
class _Pending:
    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    seq_id: int | None = None  # set by the model thread once added


class AsyncEngine:
    def __init__(self, engine: Engine | None, model_name: str):
        """`engine` may be None while the model loads; `attach` it later. The HTTP server
        is up meanwhile, answering 503 until then."""
        self.engine = engine
        self.model_name = model_name
        self._inbox: deque[tuple[str, _Pending]] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._streams: dict[int, _Pending] = {}  # model thread only
        self._error: BaseException | None = None
        # Set while the pipeline is broken (a stage died): requests get 503 until a new
        # runner is swapped in. `on_stage_failure` (set by the cluster manager) is called
        # from the model thread with the failure.
        self.unavailable: str | None = None
        self.on_stage_failure = None
        self._swap = None  # a runner waiting to replace the engine's at the next idle moment
        self._swap_lock = threading.Lock()  # hands `_swap` from the event loop to the model thread
        # Called with every runner the engine stops using (replaced, or superseded before it
        # was installed), so its owner can close its connections; set by the cluster manager.
        self.on_runner_retired = None
        self.finished = 0
        self.generated_tokens = 0

    # -- lifecycle ------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        self.engine = engine
        self.start()

    @property
    def ready(self) -> bool:
        return (self.engine is not None and self._thread is not None and self._error is None
                and self.unavailable is None)

    def swap_runner(self, runner) -> None:
        """Replace the engine's runner (local model <-> pipeline) once no request is in
        flight; requests that arrive meanwhile wait for it. Clears `unavailable`."""
        with self._swap_lock:
            superseded, self._swap = self._swap, runner
        if superseded is not None and superseded is not runner:
            self._retire(superseded)
        self._wake.set()

    def _retire(self, runner) -> None:
        if self.on_runner_retired is None or (self.engine is not None and runner is self.engine.runner):
            return
        try:
            self.on_runner_retired(runner)
        except Exception:  # a failed close must not stop the model loop
            log.exception("closing a replaced runner failed")

    def start(self) -> None:
        if self.engine is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="model-loop", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None

    # -- requests ---------------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs; the last one has `finished` set. Leaving the
        iteration early (break, aclose, cancellation) aborts the request."""
        if self._error is not None:
            raise EngineDead(f"the model loop stopped: {self._error}")
        if not self.ready:
            raise EngineNotReady(self.unavailable or f"model {self.model_name} is still loading")
        self._validate(prompt_token_ids, params)
        req = _Pending(list(prompt_token_ids), params, asyncio.Queue(), asyncio.get_running_loop())
        self._post("add", req)
        done = False
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    raise item
                done = item.finished
                yield item
                if done:
                    return
        finally:
            if not done:
                self._post("abort", req)

    def _validate(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise InvalidParameter("prompt", "must not be empty")
        vocab = self.engine.loaded.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise InvalidParameter("prompt", "token ids must be in the vocabulary")
        self.engine.check_length(len(prompt), params.max_tokens)

    def _post(self, kind: str, req: _Pending) -> None:
        self._inbox.append((kind, req))
        self._wake.set()

    def stats(self) -> EngineStats:
        e = self.engine
        if e is None:
            return EngineStats(self.model_name, 0, 0, 0, 0, 0, 0, 0, 0, 0, ready=False)
        # Plain int reads of state the model thread owns: a status snapshot may be one step old.
        return EngineStats(
            model=self.model_name, waiting=e.scheduler.num_waiting, running=e.scheduler.num_running,
            kv_blocks_used=e.kv.num_used_blocks, kv_blocks_free=e.kv.num_free_blocks,
            kv_blocks_total=e.kv.pool.num_blocks, aborted=e.num_aborted, finished=self.finished,
            generated_tokens=self.generated_tokens, max_model_len=e.max_model_len,
            ready=self.ready,
        )

    # -- model thread ------------------------------------------------------------------------
    def _deliver(self, req: _Pending, item) -> None:
        req.loop.call_soon_threadsafe(req.queue.put_nowait, item)

    def _drain_inbox(self) -> None:
        for _ in range(len(self._inbox)):
            kind, req = self._inbox.popleft()
            if kind == "add" and self._swap is not None:
                self._inbox.append((kind, req))  # admitted after the swap
                continue
            if kind == "add":
                try:
                    req.seq_id = self.engine.add_request(req.prompt, req.params)
                    self._streams[req.seq_id] = req
                except InferenceError as e:
                    self._deliver(req, e)
                except Exception as e:  # one bad request must not stop the loop for everyone
                    log.exception("request rejected by the engine")
                    self._deliver(req, InvalidParameter("request", f"the engine rejected it: {e}"))
            elif req.seq_id is not None and self._streams.pop(req.seq_id, None) is not None:
                self.engine.abort(req.seq_id)

    def _fail_in_flight(self, e: StageFailure) -> None:
        """A stage died mid-step: end every request with an error now, free its blocks."""
        log.error("pipeline step failed: %s; failing %d requests", e, len(self._streams))
        self.unavailable = f"a pipeline stage failed ({e}); waiting for the cluster to recover"
        for seq_id, req in list(self._streams.items()):
            self.engine.abort(seq_id)
            self._deliver(req, StageFailure(str(e)))
        self._streams.clear()
        for seq in list(self.engine.scheduler.waiting):  # queued ones never reached a stage
            self.engine.abort(seq.seq_id)
        if self.on_stage_failure is not None:
            self.on_stage_failure(e)

    def _run(self) -> None:
        try:
            while not self._stop:
                self._drain_inbox()
                if self._swap is not None and not self.engine.has_work:
                    # The pool is empty when idle, so no stale KV survives the swap.
                    with self._swap_lock:
                        runner, self._swap = self._swap, None
                    old, self.engine.runner = self.engine.runner, runner
                    self._retire(old)
                    self.unavailable = None
                    log.info("engine runner swapped: %s", type(self.engine.runner).__name__)
                    continue
                if not self.engine.has_work:
                    self._wake.wait()
                    self._wake.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except StageFailure as e:
                    self._fail_in_flight(e)
                    continue
                for out in outputs:
                    req = self._streams.get(out.seq_id)
                    self.generated_tokens += len(out.token_ids)
                    if out.finished:
                        self._streams.pop(out.seq_id, None)
                        self.finished += 1
                    if req is not None:
                        self._deliver(req, out)
        except BaseException as e:  # keep serving errors, not hangs, to every waiting client
            log.exception("model loop crashed")
            self._error = e
        # Nobody may wait forever: fail what is still in flight (crash or shutdown).
        why = f"the model loop stopped: {self._error}" if self._error else "the server is shutting down"
        for req in list(self._streams.values()) + [r for _, r in self._inbox]:
            self._deliver(req, EngineDead(why))
        self._streams.clear()

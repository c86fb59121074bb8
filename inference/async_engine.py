"""AsyncEngine: async streams of text deltas over the synchronous Engine.

The model loop runs in its own thread and sleeps on a `threading.Event` when there is
nothing to do (no busy polling). The event loop hands it requests and aborts through a
thread-safe inbox; outputs travel back through each request's `asyncio.Queue`.
Nothing outside this module holds the Engine: `ui/` and `cluster/` use AsyncEngine's methods."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from .config import SamplingParams
from .engine import Engine, RequestOutput
from .errors import InferenceError, InvalidParameter, StageFailure
from .runner import Runner

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


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the status page, the chat page and the master's node row show about the loaded
    model; fixed once the Engine is attached."""

    device: str
    layer_start: int  # decoder layers [layer_start, layer_end) this process runs itself
    layer_end: int
    num_layers: int  # of the whole model
    max_model_len: int
    generation_config: dict[str, Any]  # the model's generation_config.json ({} if none)
    quant: str  # how this process holds its weights: "none", "int8" or "int4"


@dataclass(slots=True)
class _Pending:
    prompt: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    seq_id: int | None = None  # set by the model thread once added


class AsyncEngine:
    """The one door to the model for `ui/` and `cluster/`: requests (`generate`), what they
    need to build them (`encode`, `encode_chat`, `check_length`, `tokenizer`), what they show
    (`stats`, `info`), and the cluster's levers (`swap_runner`, `set_unavailable`).

    Invariants: only the model thread touches the Engine's mutable state (scheduler, KV,
    runner) after `start()`; the other methods read what never changes once attached (the
    tokenizer, the config, the context length). Availability changes only under `_lock`."""

    def __init__(
        self, engine: Engine | None, model_name: str, on_stage_failure: Callable[[StageFailure], None] | None = None
    ):
        """`engine` may be None while the model loads; `attach` it later. The HTTP server
        is up meanwhile, answering 503 until then. `on_stage_failure(e)` is called from the
        model thread after a broken pipeline failed its requests (the cluster re-plans)."""
        self._engine = engine
        self.model_name = model_name
        self._on_stage_failure = on_stage_failure
        self._inbox: deque[tuple[str, _Pending]] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._streams: dict[int, _Pending] = {}  # model thread only
        self._error: BaseException | None = None
        self._lock = threading.Lock()  # guards _unavailable and _swap (event loop <-> model thread)
        # Set while the pipeline is broken (a stage died) or has no workers: requests get 503
        # until a new runner is swapped in.
        self._unavailable: str | None = None
        self._swap: Runner | None = None  # a runner waiting to replace the engine's at an idle moment
        self._finished = 0
        self._generated_tokens = 0

    # -- lifecycle ------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        """Serve with `engine` from now on (its runner is ready); clears `unavailable`."""
        with self._lock:
            self._engine, self._unavailable = engine, None
        self.start()

    @property
    def attached(self) -> bool:
        return self._engine is not None

    @property
    def ready(self) -> bool:
        with self._lock:
            return (
                self._engine is not None
                and self._thread is not None
                and self._error is None
                and self._unavailable is None
            )

    @property
    def unavailable(self) -> str | None:
        """Why requests are refused while a model is attached, or None."""
        with self._lock:
            return self._unavailable

    def set_unavailable(self, reason: str) -> None:
        """Refuse new requests with `reason` until the next `swap_runner` or `attach`."""
        with self._lock:
            self._unavailable = reason

    def swap_runner(self, runner: Runner) -> None:
        """Replace the engine's runner (local model <-> pipeline) once no request is in
        flight; requests that arrive meanwhile wait for it. Clears `unavailable` when it is
        installed. The runner it replaces, or a waiting one it supersedes, is closed."""
        with self._lock:
            superseded, self._swap = self._swap, runner
        if superseded is not None and superseded is not runner:
            self._retire(superseded)
        self._wake.set()

    def _retire(self, runner: Runner) -> None:
        if self._engine is not None and runner is self._engine.runner:
            return
        try:
            runner.close()
        except Exception:  # a failed close must not stop the model loop
            log.exception("closing a replaced runner failed")

    def start(self) -> None:
        if self._engine is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="model-loop", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None

    # -- what callers need to build requests (immutable once attached) ------------------------
    def _loaded(self) -> Engine:
        if self._engine is None:
            raise EngineNotReady(f"model {self.model_name} is still loading")
        return self._engine

    @property
    def tokenizer(self):
        return self._loaded().tokenizer

    @property
    def max_model_len(self) -> int:
        return self._loaded().max_model_len

    def encode(self, text: str) -> list[int]:
        """Token ids of raw text (blocking: call it off the event loop)."""
        return self._loaded().encode(text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat through the model's template (blocking: off the event loop)."""
        return self._loaded().encode_chat(messages)

    def check_length(self, num_prompt_tokens: int, max_tokens: int, param: str = "messages") -> None:
        self._loaded().check_length(num_prompt_tokens, max_tokens, param)

    def info(self) -> ModelInfo | None:
        """The loaded model's fixed facts; None while loading."""
        e = self._engine
        if e is None:
            return None
        rng = e.loaded.layers
        return ModelInfo(
            device=e.cfg.device,
            layer_start=rng.start,
            layer_end=rng.end,
            num_layers=rng.num_layers,
            max_model_len=e.max_model_len,
            generation_config=e.generation_config,
            quant=e.loaded.quant,
        )

    # -- requests ---------------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs; the last one has `finished` set. Leaving the
        iteration early (break, aclose, cancellation) aborts the request."""
        if self._error is not None:
            raise EngineDead(f"the model loop stopped: {self._error}")
        if not self.ready:
            raise EngineNotReady(self.unavailable or f"model {self.model_name} is still loading")
        self._loaded().validate_prompt(prompt_token_ids, params.max_tokens)
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

    def _post(self, kind: str, req: _Pending) -> None:
        self._inbox.append((kind, req))
        self._wake.set()

    def stats(self) -> EngineStats:
        e = self._engine
        if e is None:
            return EngineStats(self.model_name, 0, 0, 0, 0, 0, 0, 0, 0, 0, ready=False)
        # Plain int reads of state the model thread owns: a status snapshot may be one step old.
        return EngineStats(
            model=self.model_name,
            waiting=e.scheduler.num_waiting,
            running=e.scheduler.num_running,
            kv_blocks_used=e.kv.num_used_blocks,
            kv_blocks_free=e.kv.num_free_blocks,
            kv_blocks_total=e.kv.pool.num_blocks,
            aborted=e.num_aborted,
            finished=self._finished,
            generated_tokens=self._generated_tokens,
            max_model_len=e.max_model_len,
            ready=self.ready,
        )

    # -- model thread ------------------------------------------------------------------------
    def _deliver(self, req: _Pending, item) -> None:
        req.loop.call_soon_threadsafe(req.queue.put_nowait, item)

    def _drain_inbox(self, engine: Engine) -> None:
        for _ in range(len(self._inbox)):
            kind, req = self._inbox.popleft()
            if kind == "add" and self._swap is not None:
                self._inbox.append((kind, req))  # admitted after the swap
                continue
            if kind == "add":
                try:
                    req.seq_id = engine.add_request(req.prompt, req.params)
                    self._streams[req.seq_id] = req
                except InferenceError as e:
                    self._deliver(req, e)
                except Exception as e:  # one bad request must not stop the loop for everyone
                    log.exception("request rejected by the engine")
                    self._deliver(req, InvalidParameter("request", f"the engine rejected it: {e}"))
            elif req.seq_id is not None and self._streams.pop(req.seq_id, None) is not None:
                engine.abort(req.seq_id)

    def _fail_in_flight(self, engine: Engine, e: StageFailure) -> None:
        """A stage died mid-step: end every request with an error now, free its blocks."""
        log.error("pipeline step failed: %s; failing %d requests", e, len(self._streams))
        self.set_unavailable(f"a pipeline stage failed ({e}); waiting for the cluster to recover")
        for seq_id, req in list(self._streams.items()):
            engine.abort(seq_id)
            self._deliver(req, StageFailure(str(e)))
        self._streams.clear()
        for seq in list(engine.scheduler.waiting):  # queued ones never reached a stage
            engine.abort(seq.seq_id)
        if self._on_stage_failure is not None:
            try:
                self._on_stage_failure(e)
            except Exception:
                log.exception("on_stage_failure failed")

    def _install_swap(self, engine: Engine) -> None:
        # Called only when idle: the pool is empty, so no stale KV survives the swap.
        with self._lock:
            runner, self._swap = self._swap, None
            self._unavailable = None
        assert runner is not None  # only the model thread takes a waiting runner
        old, engine.runner = engine.runner, runner
        self._retire(old)
        log.info("engine runner swapped: %s", type(runner).__name__)

    def _run(self) -> None:
        engine = self._engine
        assert engine is not None  # start() runs the loop only once an engine is attached
        try:
            while not self._stop:
                self._drain_inbox(engine)
                if self._swap is not None and not engine.has_work:
                    self._install_swap(engine)
                    continue
                if not engine.has_work:
                    self._wake.wait()
                    self._wake.clear()
                    continue
                try:
                    outputs = engine.step()
                except StageFailure as e:
                    self._fail_in_flight(engine, e)
                    continue
                for out in outputs:
                    req = self._streams.get(out.seq_id)
                    self._generated_tokens += len(out.token_ids)
                    if out.finished:
                        self._streams.pop(out.seq_id, None)
                        self._finished += 1
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

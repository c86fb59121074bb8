"""AsyncEngine: async streams of token outputs over the synchronous Engine.

The Engine runs in a `ModelLoop` thread; the event loop hands it requests and aborts and
reads outputs back through each request's `asyncio.Queue`. Nothing outside this module and
the loop holds the Engine: `ui/` and `cluster/` use AsyncEngine's methods.

Requests pass `Admission` first (per-request limits, a bounded queue). While the engine is
unavailable (a stage died, the cluster re-plans) requests that have produced nothing yet wait
for it to come back, up to `AdmissionLimits.unavailable_wait_s`; ones that already streamed
tokens end with an error, since their KV died with the stage."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from .admission import Admission, AdmissionLimits, QueueFull, RequestTooLarge
from .config import SamplingParams
from .engine import Engine, RequestOutput
from .errors import StageFailure
from .grammar import Grammar
from .kv_cache import PrefixStats
from .metrics import TokenMetrics
from .model_loop import Availability, EngineDead, EngineNotReady, EngineUnavailable, ModelLoop, Pending
from .multimodal import ImageInputs
from .runner import Runner

log = logging.getLogger(__name__)

__all__ = [
    "AsyncEngine",
    "EngineDead",
    "EngineNotReady",
    "EngineStats",
    "EngineUnavailable",
    "ModelInfo",
    "QueueFull",
    "RequestStream",
    "RequestTooLarge",
]


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
    prefix_cache: PrefixStats | None = None  # None: off (or no model yet)


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
    backend: str = "torch"  # what runs this process's layers: "torch" or "mlx"
    # The vision tower's weights in this process (it runs where the embedding is: the
    # master); 0 for a text-only model.
    vision_bytes: int = 0


class RequestStream:
    """The outputs of one submitted engine request, as an async iterator; the last one has
    `finished` set. `close()` (or `aclose()`) before the end aborts the request and frees
    its KV blocks; it works even if the stream was never iterated.

    Invariant: the request counts in the engine's admission until the stream ends (its last
    output or an error was taken, or it was closed), exactly once."""

    def __init__(self, admission: Admission, loop: ModelLoop, req: Pending):
        self._admission = admission
        self._loop = loop
        self._req = req
        self._ended = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._ended:
            raise StopAsyncIteration
        item = await self._req.queue.get()
        if isinstance(item, BaseException):
            self._end(None)
            raise item
        if item.finished:
            self._end(time.monotonic() - self._req.t_submit)
        return item

    def close(self) -> None:
        if not self._ended:
            self._end(None)
            self._req.closed = True
            self._loop.post("abort", self._req)

    async def aclose(self) -> None:
        self.close()

    def _end(self, seconds: float | None) -> None:
        self._ended = True
        self._admission.release(seconds)


class AsyncEngine:
    """The one door to the model for `ui/` and `cluster/`: requests (`submit`, `generate`),
    what they need to build them (`encode`, `encode_chat`, `check_length`, `tokenizer`), what
    they show (`stats`, `info`), and the cluster's levers (`swap_runner`, `set_unavailable`).

    Invariants: only the model thread touches the Engine's mutable state after `start()`;
    the other methods read what never changes once attached (the tokenizer, the config, the
    context length). Availability lives in one `Availability`, under its lock."""

    def __init__(
        self,
        engine: Engine | None,
        model_name: str,
        on_stage_failure: Callable[[StageFailure], None] | None = None,
        limits: AdmissionLimits | None = None,
    ):
        """`engine` may be None while the model loads; `attach` it later. The HTTP server
        is up meanwhile, answering 503 until then. `on_stage_failure(e)` is called from the
        model thread after a broken pipeline failed its requests (the cluster re-plans).
        `limits`: admission control (default: `AdmissionLimits()`)."""
        self._engine = engine
        self.model_name = model_name
        self._on_stage_failure = on_stage_failure
        self.admission = Admission(limits or AdmissionLimits())
        self._availability = Availability()
        self._loop: ModelLoop | None = None
        self._groups = itertools.count()
        # TTFT, ITL and prompt tokens: written by the model thread, read by GET /metrics.
        self.token_metrics = TokenMetrics()

    # -- lifecycle ------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        """Serve with `engine` from now on (its runner is ready); clears `unavailable`."""
        self._engine = engine
        self._availability.set_unavailable(None)
        self.start()
        if self._loop is not None:
            self._loop.wake()

    @property
    def attached(self) -> bool:
        return self._engine is not None

    @property
    def accepting(self) -> bool:
        """Whether requests are taken (they may still wait for an unavailable engine)."""
        return self._engine is not None and self._loop is not None and not self._loop.stopping

    @property
    def ready(self) -> bool:
        return self.accepting and self._availability.reason is None

    @property
    def unavailable(self) -> str | None:
        """Why requests wait while a model is attached, or None."""
        return self._availability.reason

    def set_unavailable(self, reason: str) -> None:
        """Hold new and queued requests (they fail with `reason` after the wait bound)
        until the next `swap_runner` or `attach`."""
        self._availability.set_unavailable(reason)
        if self._loop is not None:
            self._loop.wake()

    def swap_runner(self, runner: Runner) -> None:
        """Replace the engine's runner (local model <-> pipeline) once no sequence runs;
        requests that arrive meanwhile wait for it. Clears `unavailable` when it is
        installed. The runner it replaces, or a waiting one it supersedes, is closed."""
        superseded = self._availability.offer(runner)
        if superseded is not None and superseded is not runner:
            self._retire(superseded)
        if self._loop is not None:
            self._loop.wake()

    def _retire(self, runner: Runner) -> None:
        if self._engine is not None and runner is self._engine.runner:
            return
        try:
            runner.close()
        except Exception:  # a failed close must not stop the model loop
            log.exception("closing a replaced runner failed")

    def start(self) -> None:
        if self._engine is not None and self._loop is None:
            self._loop = ModelLoop(
                self._engine,
                self._availability,
                self.admission.limits.unavailable_wait_s,
                self._retire,
                self._on_stage_failure,
                self.token_metrics,
            )
            self._loop.start()

    async def shutdown(self) -> None:
        if self._loop is not None:
            await asyncio.to_thread(self._loop.stop, 10)

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

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of a chat (and its tool definitions) through the model's template
        (blocking: off the event loop)."""
        return self._loaded().encode_chat(messages, tools)

    @property
    def has_vision(self) -> bool:
        """Whether the model reads images (False while none is loaded)."""
        return self._engine is not None and self._engine.image_prompter is not None

    def encode_chat_images(
        self, messages: list[dict], images: list[Any], tools: list[dict] | None = None
    ) -> tuple[list[int], ImageInputs]:
        """A chat with pictures ({"type": "image"} parts, one per PIL image): the expanded
        prompt and its ImageInputs; InvalidParameter for a model without vision (blocking)."""
        return self._loaded().encode_chat_images(messages, images, tools)

    def check_grammar(self, grammar: Grammar) -> None:
        """InvalidParameter naming `grammar.param` unless the grammar compiles (blocking:
        off the event loop). A checked grammar is cached, so the model thread only copies it."""
        self._loaded().check_grammar(grammar)

    def check_length(self, num_prompt_tokens: int, max_tokens: int, param: str = "messages") -> None:
        self._loaded().check_length(num_prompt_tokens, max_tokens, param)

    def validate_prompt(self, prompt_token_ids: list[int], max_tokens: int) -> None:
        """InvalidParameter ("prompt") unless the ids are in the vocabulary and fit the context."""
        self._loaded().validate_prompt(prompt_token_ids, max_tokens)

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
            backend=e.cfg.backend,
            vision_bytes=e.vision_bytes,
        )

    # -- requests ---------------------------------------------------------------------------
    def submit(
        self, requests: list[tuple[list[int], SamplingParams]], images: ImageInputs | None = None
    ) -> list[RequestStream]:
        """Queue the choices of one client request together (call it on the event loop):
        all are admitted or none. Raises EngineDead, EngineNotReady (still loading),
        InvalidParameter (a prompt), RequestTooLarge or QueueFull (admission). `images`: the
        pictures of the prompt every request shares (one chat request's n choices)."""
        loop = self._loop
        if loop is not None and loop.error is not None:
            raise EngineDead(f"the model loop stopped: {loop.error}")
        if loop is not None and loop.stopping:
            raise EngineDead("the server is shutting down")
        if loop is None or self._engine is None:
            raise EngineNotReady(f"model {self.model_name} is still loading")
        engine = self._engine
        for ids, params in requests:
            engine.validate_prompt(ids, params.max_tokens)
        self.admission.check([(len(ids), params.max_tokens) for ids, params in requests])
        self.admission.admit(len(requests), engine.cfg.max_batch)
        group, now, event_loop = next(self._groups), time.monotonic(), asyncio.get_running_loop()
        streams = []
        for ids, params in requests:
            req = Pending(list(ids), params, asyncio.Queue(), event_loop, group, now, images=images)
            streams.append(RequestStream(self.admission, loop, req))
            loop.post("add", req)
        return streams

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, images: ImageInputs | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs; the last one has `finished` set. Leaving the
        iteration early (break, aclose, cancellation) aborts the request."""
        stream = self.submit([(prompt_token_ids, params)], images)[0]
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def stats(self) -> EngineStats:
        e, loop = self._engine, self._loop
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
            finished=loop.finished if loop else 0,
            generated_tokens=loop.generated_tokens if loop else 0,
            max_model_len=e.max_model_len,
            ready=self.ready,
            prefix_cache=e.kv.prefix_stats(),
        )

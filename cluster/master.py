"""The master process: builds, starts and stops its parts.

    AsyncEngine ── the model (alone, TP group, or pipeline master)
    ControlServer ── /ws/worker, where workers join
    ResultServer ── the ring's gRPC endpoint, where the last stage answers
    ClusterManager ── plans layers over the workers and swaps the engine's runner
    FastAPI app ── the OpenAI routes, status, and the Gradio page (ui/)

`Master.serve()` binds everything, loads the model in the background while the HTTP server
already answers (503 until ready), and tears everything down when uvicorn stops. `_boot` is
the one place that decides how the master serves: alone, alone over a TP group, or as a
pipeline master waiting for workers."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import uvicorn

from inference.admission import AdmissionLimits
from inference.async_engine import AsyncEngine
from inference.compute_thread import in_fresh_thread
from inference.config import EngineConfig, LayerRange
from inference.errors import InferenceError, StageFailure
from ui.images import ImageLimits

from .control import ControlServer
from .control_guard import exposure_error
from .local_node import MasterNode
from .manager import ClusterManager
from .registry import NodeRegistry
from .ring import ResultServer

if TYPE_CHECKING:
    from .tls import ClusterCA

log = logging.getLogger(__name__)


@dataclass(slots=True)
class MasterConfig:
    """Everything `python app.py` decides from its flags."""

    engine: EngineConfig
    name: str  # the model id clients use
    host: str = "127.0.0.1"
    port: int = 7860
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()  # CORS: browser origins allowed to call the API
    join_token: str | None = None
    insecure: bool = False  # allow a non-loopback host without a join token (app.py warns loudly)
    tls: bool = False  # mutual TLS on gRPC, with a CA this master generates (cluster.tls)
    workers: int | None = None  # wait for N workers and hold no layers; None: serve alone
    grpc_port: int = 0
    advertise_host: str | None = None
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0
    ui: bool = True
    limits: AdmissionLimits = field(default_factory=AdmissionLimits)  # admission control, queue waits
    images: ImageLimits = field(default_factory=ImageLimits)  # pictures in chat requests (vision models)

    def __post_init__(self) -> None:
        if reason := exposure_error(self.host, self.join_token, self.insecure):
            raise ValueError(reason)
        if self.workers is not None and self.workers < 1:
            raise ValueError("--workers must be >= 1")
        if not 0 < self.heartbeat_interval < self.heartbeat_timeout:
            raise ValueError("need 0 < --heartbeat-interval < --heartbeat-timeout")
        if self.engine.tp > 1 and self.workers:
            raise ValueError("--tp applies to a master that serves alone; with --workers give each worker --tp")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def result_host(self) -> str | None:
        """The address the last stage sends results to, if the flags fix one (a wildcard bind
        is no address to give: then each worker's control connection tells)."""
        return self.advertise_host or (None if self.host in ("0.0.0.0", "::", "") else self.host)


class Master:
    """Invariant: `manager` is None until the model is loaded, and stays None for a TP master
    (its layers are split over ranks, so it cannot hand them to workers). `failure` is set at
    most once, by a failed load, and makes `serve()` stop the server and return it."""

    def __init__(self, cfg: MasterConfig, announce: Callable[[str], None] = log.info):
        """`announce` gets the lines meant for the person who started the master (how to
        join workers, the URL once ready); app.py prints them on stderr."""
        self.cfg = cfg
        self.announce = announce
        self.registry = NodeRegistry()
        self.ca: ClusterCA | None = None
        tls = None
        if cfg.tls:  # the CA lives as long as this process; workers get its certificates when they join
            from .tls import ClusterCA

            self.ca = ClusterCA()
            tls = self.ca.node_tls("master")
        self.control = ControlServer(
            self.registry,
            cfg.join_token,
            cfg.heartbeat_interval,
            cfg.heartbeat_timeout,
            model_name=cfg.name,
            on_change=lambda node_id, event: self._poke(),
            ca=self.ca,
        )
        self.engine = AsyncEngine(None, cfg.name, on_stage_failure=self._on_stage_failure, limits=cfg.limits)
        self.results = ResultServer(tls)
        self.node = MasterNode(self.engine, cfg.url)  # this master's own row in the node list
        self.manager: ClusterManager | None = None
        self.failure: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._boot_task: asyncio.Task | None = None
        self.app = self._build_app()

    # -- wiring -------------------------------------------------------------------------
    def _build_app(self):
        from ui.server import build_app

        app = build_app(
            self.engine,
            api_key=self.cfg.api_key,
            allowed_origins=self.cfg.allowed_origins,
            on_startup=self._on_startup,
            status_extra=self.status_extra,
            image_limits=self.cfg.images,
        )
        app.add_api_websocket_route("/ws/worker", self.control.handle)
        if self.cfg.ui:
            from ui.web import mount_ui

            app = mount_ui(app, self.engine, self.registry, api_key=self.cfg.api_key, master=self.node)
        return app

    def status_extra(self) -> dict:
        """What /api/status adds to the engine's stats: the nodes (this master first refreshed,
        also without the web page, which refreshes it too) and the cluster's plan."""
        self.node.refresh(self.registry)
        nodes = [dict(dataclasses.asdict(n), state=n.state.value) for n in self.registry.snapshot()]
        info = self.engine.info()
        return dict(
            nodes=nodes,
            quant=info.quant if info else None,
            tls=self.ca is not None,
            cluster=self.manager.to_json() if self.manager else None,
        )

    def _poke(self) -> None:
        if self.manager is not None:
            self.manager.poke()

    def _on_stage_failure(self, e: StageFailure) -> None:
        # Called from the model thread: the manager lives on the event loop.
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._poke)

    # -- lifecycle ----------------------------------------------------------------------
    def serve(self) -> str | None:
        """Run until interrupted or a fatal load error; returns that error, or None."""
        try:
            self.results.start(self.cfg.host, self.cfg.grpc_port)
        except OSError as e:
            return str(e)
        server = self._server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host=self.cfg.host,
                port=self.cfg.port,
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=5,
            )
        )
        try:
            server.run()
        except KeyboardInterrupt:
            pass
        finally:
            self.results.stop()
        return self.failure

    async def _on_startup(self) -> None:
        self._loop = asyncio.get_running_loop()
        log.info("serving on %s; loading %s ...", self.cfg.url, self.cfg.engine.model)
        self._boot_task = self._loop.create_task(self._boot(), name="boot")

    async def _boot(self) -> None:
        """Load the model off the event loop, then hand the cluster to its manager."""
        try:
            self.manager = await in_fresh_thread(self._load, name="load")
        except InferenceError as e:
            self.failure = str(e)
        except Exception as e:  # an unexpected load failure still ends in one line, not a hang
            log.exception("model load failed")
            self.failure = f"model load failed: {type(e).__name__}: {e}"
        if self.failure is not None:
            if self._server is not None:
                self._server.should_exit = True
            return
        if self.manager is not None:
            self.manager.start()

    def _load(self) -> ClusterManager | None:
        """The one place that decides how the master serves; runs in a worker thread."""
        from inference.engine import Engine, kv_pool_blocks, load_tokenizer
        from inference.loader import DTYPES, load_model, read_config, resolve_quant
        from inference.model_runner import ModelRunner
        from inference.model_source import resolve_model
        from inference.tp_runner import tp_engine

        # Resolved once, here: the master, its TP ranks and every worker hold the weights alike.
        cfg = dataclasses.replace(
            self.cfg.engine, quant=resolve_quant(self.cfg.engine.quant, self.cfg.engine.model, self.cfg.engine.device)
        )
        advertise = self.cfg.result_host
        if self.cfg.workers:  # a pipeline master: the embedding, final norm and LM head, no layers
            n = read_config(resolve_model(cfg.model)).num_layers
            ends = load_model(
                cfg.model, cfg.dtype, cfg.device, layers=LayerRange(0, 0, n, embed=True, head=True), quant=cfg.quant
            )
            tokenizer = load_tokenizer(ends.path)
            num_blocks = kv_pool_blocks(cfg, ends.config, n, quant=ends.quant)  # every stage holds the same block ids
            local = ModelRunner(
                ends.model,
                ends.config,
                ends.layers,
                num_blocks,
                cfg.block_size,
                DTYPES[cfg.dtype],
                cfg.device,
                ends.quant,
            )

            def make_engine(runner):
                return Engine(cfg, loaded=ends, tokenizer=tokenizer, num_blocks=num_blocks, runner=runner)

            self.announce(f"waiting for {self.cfg.workers} worker(s): python -m cluster.worker --master {self.cfg.url}")
            return ClusterManager(
                self.engine,
                self.control,
                self.results,
                cfg,
                ends.config,
                local,
                num_blocks,
                want_workers=self.cfg.workers,
                make_engine=make_engine,
                advertise_host=advertise,
            )
        # Alone: with --tp, ranks 1..N-1 start here and stop when this process exits. A TP
        # master keeps its layers (a pipeline master embeds on its own, which a vocabulary split
        # over ranks cannot do), so joining workers get nothing and there is no manager.
        if cfg.backend == "mlx":  # like a TP master, an MLX master keeps its layers: no manager
            from inference.mlx.engine import mlx_engine

            engine = mlx_engine(cfg)
        else:
            engine = tp_engine(cfg, self.cfg.host) if cfg.tp > 1 else Engine(cfg)
        manager = None
        if cfg.tp == 1 and cfg.backend == "torch":
            assert isinstance(engine.runner, ModelRunner)
            manager = ClusterManager(
                self.engine,
                self.control,
                self.results,
                cfg,
                engine.loaded.config,
                engine.runner,
                engine.kv.pool.num_blocks,
                advertise_host=advertise,
            )
        self.engine.attach(engine)  # last: nothing after it can fail the load
        log.info("model %s ready (%.1f s)", self.cfg.name, engine.load_seconds)
        self.announce(f"ready: {self.cfg.url}  (OpenAI API at {self.cfg.url}/v1)")
        return manager

"""The master's cluster manager: plans layers over the workers, assigns them, and swaps
the engine between serving alone and serving through the pipeline.

- `--workers N`: the master holds the embedding and head only; it waits for N workers,
  plans all decoder layers over them, and serves once every stage reports ready. A lost
  stage fails its requests (the AsyncEngine does that) and the master waits for a
  replacement, re-planning as soon as enough workers are connected.
- without `--workers`: the master serves alone with the whole model; workers that join
  take over the decoder layers; when they are all gone the master takes the layers back.
A worker that joins a serving cluster triggers a re-plan only if the plan with it is
predicted to decode clearly faster (cluster.throughput); with `--workers N` and N stages
serving it never does. Otherwise it stands by (`standby` in the status) and is the first
choice when a stage is lost. During such a re-plan the engine is unavailable: new requests
wait (the AsyncEngine holds them) while the running ones finish on the old stages, which
reload only then. A first plan (the master serving alone) waits for a moment with no
request in flight instead: its old runner is the master's own model, which keeps serving
meanwhile. Workers that re-register holding the layers of the plan the master would make
anyway (after a master restart) are adopted without a reload: they get the same range
again, with the new plan's data-plane keys, and keep their weights."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

from inference.async_engine import AsyncEngine
from inference.config import EngineConfig, ModelConfig
from inference.engine import Engine
from inference.loader import DTYPES
from inference.model_runner import ModelRunner
from inference.runner import Runner

from .control import ControlServer
from .control_messages import Assign, Holding
from .data_auth import PlanAuth, wrap_keys
from .pipeline import PipelineRunner
from .planner import LayerCost, NodeCapacity, Plan, PlanError, plan_layers
from .ring import ResultServer, RingClient
from .throughput import MIN_GAIN, StageSpeed, gain
from .worker_conn import ControlError, WorkerConn

log = logging.getLogger(__name__)

# connect(first stage's address, where the last stage sends results) -> the engine's runner
Connect = Callable[[str, str], Runner]


class ClusterManager:
    """Invariant: `plan` is what the engine's runner serves right now (None = the master
    serves alone, or nothing serves yet); it changes only inside `_replan`, one at a time.

    `local` is the master's ModelRunner holding the embedding and the head: with
    `want_workers=None` it holds every layer too and already serves (the master serves alone
    until workers join); with `want_workers=N` it holds no layers, and `make_engine(runner)`
    builds the Engine once the first pipeline is ready. `connect` builds a pipeline's runner
    (a ring through the stages by default; tests pass a fake)."""

    def __init__(
        self,
        aengine: AsyncEngine,
        control: ControlServer,
        results: ResultServer,
        cfg: EngineConfig,
        mcfg: ModelConfig,
        local: ModelRunner,
        num_blocks: int,
        *,
        want_workers: int | None = None,
        make_engine: Callable[[Runner], Engine] | None = None,
        advertise_host: str | None = None,
        load_timeout: float = 600.0,
        connect: Connect | None = None,
    ):
        if cfg.quant == "auto":
            raise ValueError("resolve --quant auto before planning: every stage must hold its weights the same way")
        if (want_workers is None) != (make_engine is None):
            raise ValueError("make_engine is needed exactly when the master waits for workers")
        self.aengine = aengine
        self.control = control
        self.results = results
        self.cfg = cfg
        self.mcfg = mcfg
        self.local = local
        self.num_blocks = num_blocks
        self.want_workers = want_workers
        self.make_engine = make_engine
        self.advertise_host = advertise_host
        self.load_timeout = load_timeout
        self._connect = connect or self._ring
        self.cost = LayerCost.for_model(
            mcfg, DTYPES[cfg.dtype].itemsize, num_blocks, cfg.block_size, cfg.max_batch_tokens
        )
        self.plan: Plan | None = None
        self.auth: PlanAuth | None = None  # the data-plane credentials of the last plan connected
        self.plan_error: str | None = None
        self.loads: dict[str, int] = {}  # node_id -> the worker's load counter, for the plan's stages
        self._standby: set[str] = set()  # the spare workers already logged as standing by
        self._plan_ids = itertools.count(1)
        self._poke = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def serves_alone(self) -> bool:
        """True when the master holds every layer itself (and takes them back with no workers)."""
        return self.want_workers is None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cluster-manager")
        self.poke()

    def poke(self) -> None:
        self._poke.set()

    async def _run(self) -> None:
        while True:
            await self._poke.wait()
            self._poke.clear()
            try:
                await self._replan()
            except Exception:  # the manager must outlive any one bad re-plan
                log.exception("re-plan failed")
                await asyncio.sleep(1.0)
                self.poke()

    def _busy(self) -> bool:
        s = self.aengine.stats()
        return self.aengine.ready and (s.running > 0 or s.waiting > 0)

    def _workers(self) -> list[WorkerConn]:
        return [w for w in self.control.workers() if not w.closed]

    def to_json(self) -> dict:
        return dict(
            mode="pipeline" if self.plan else "local",
            want_workers=self.want_workers,
            num_blocks=self.num_blocks,
            plan=self.plan.to_json() if self.plan else None,
            plan_error=self.plan_error,
            loads=dict(self.loads),
            standby=sorted(w.node_id for w in self._workers() if self.plan and w.node_id not in self._stages()),
            ring=dict(port=self.results.port, results=self.results.results, errors=self.results.errors),
        )

    def _stages(self) -> set[str]:
        return {a.node_id for a in self.plan.assignments} if self.plan else set()

    async def _replan(self) -> None:
        workers = self._workers()
        current = self._stages()
        healthy = current <= {w.node_id for w in workers} and self.aengine.unavailable is None
        if healthy and current:
            spares = [w for w in workers if w.node_id not in current]
            if not spares or not self._worth_replanning(workers, spares):
                return  # nothing changed, or the spares stand by
            # The stages about to reload still serve the running requests: new ones wait.
            self.aengine.set_unavailable(f"re-planning for {len(spares)} more worker(s)")
            await self._quiesce()
            workers = self._workers()
        elif healthy and self._busy():
            await asyncio.sleep(0.2)  # a first plan: switch from the local model between requests
            self.poke()
            return
        if self.want_workers and len(workers) < self.want_workers:
            self._unavailable(f"waiting for workers: {len(workers)} of {self.want_workers} connected")
            return
        if not workers:
            self._serve_locally()
            return
        try:
            plan, used = self._choose(workers)
        except PlanError as e:
            log.error("cannot plan layers over %d workers: %s", len(workers), e)
            self.plan_error = str(e)
            if not self.serves_alone:
                self._unavailable(f"no plan fits: {e}")
            elif self.aengine.unavailable:  # a re-plan held requests: serve them alone instead
                self._serve_locally()
            return
        self.plan_error = None
        await self._apply(plan, used)

    def _worth_replanning(self, workers: list[WorkerConn], spares: list[WorkerConn]) -> bool:
        """Whether the plan over `workers` (current stages and `spares`) is predicted to be
        clearly faster than the one serving; if not, the spares stand by."""
        assert self.plan is not None
        if self.want_workers and len(self.plan.assignments) >= self.want_workers:
            why = f"the cluster has its {self.want_workers} worker(s)"
        else:
            speeds = {w.node_id: StageSpeed(w.capacity.matmul_gflops, w.pings.rtt_ms) for w in workers}
            flops = 2 * self.cost.weight_bytes / DTYPES[self.cfg.dtype].itemsize  # a multiply-add per weight
            try:
                x = gain(self.plan, self._choose(workers)[0], speeds, flops)
            except PlanError as e:
                why = f"no plan with it fits ({e})"
            else:
                if x >= MIN_GAIN:
                    log.info("re-planning: a plan with %s is predicted %.2fx as fast", ", ".join(sorted(speeds)), x)
                    return True
                why = f"a plan with it is predicted {x:.2f}x as fast, under the {MIN_GAIN:.2f}x worth a reload"
        new = sorted(w.node_id for w in spares if w.node_id not in self._standby)
        if new:
            log.info("worker(s) %s stand by: %s", ", ".join(new), why)
        self._standby = {w.node_id for w in spares}
        return False

    async def _quiesce(self) -> None:
        """Wait until no request runs: the unavailable engine starts none, the running ones finish."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.load_timeout
        while self.aengine.stats().running and loop.time() < deadline:
            await asyncio.sleep(0.05)

    def _choose(self, workers: list[WorkerConn]) -> tuple[Plan, list[WorkerConn]]:
        """The plan to serve with, and the workers it uses. Serving alone: all of them. With
        --workers N: the first N by preference (the current plan's stages, then workers that
        hold our layers, then join order), and more only if N cannot hold the model."""
        if not self.want_workers:
            return self._make_plan(workers), workers
        stages = [a.node_id for a in self.plan.assignments] if self.plan else []

        def rank(iw: tuple[int, WorkerConn]) -> tuple[int, int]:
            i, w = iw
            if w.node_id in stages:
                return 0, stages.index(w.node_id)
            if w.holding and self._ours(w.holding):
                return 1, w.holding.start
            return 2, i

        ordered = [w for _, w in sorted(enumerate(workers), key=rank)]
        for k in range(min(self.want_workers, len(ordered)), len(ordered)):
            try:
                return self._make_plan(ordered[:k]), ordered[:k]
            except PlanError:
                continue  # not enough memory in k workers: try one more
        return self._make_plan(ordered), ordered

    def _ours(self, h: Holding) -> bool:
        """Whether a worker's loaded layers are of the model this master serves, held the same way."""
        return (h.model, h.num_layers, h.dtype, h.quant) == (
            self.cfg.model,
            self.mcfg.num_layers,
            self.cfg.dtype,
            self.cfg.quant,
        )

    def _make_plan(self, workers: list[WorkerConn]) -> Plan:
        n = self.mcfg.num_layers
        holdings = {w.node_id: w.holding for w in workers if w.holding and self._ours(w.holding)}
        covered = sorted((h.start, h.end) for h in holdings.values())
        adoptable = (
            len(holdings) == len(workers)
            and covered
            and covered[0][0] == 0
            and covered[-1][1] == n
            and all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
        )
        nodes = []
        for w in workers:
            layers = w.capacity.layers
            override: int | tuple[int, int] | None
            if adoptable:
                override = (holdings[w.node_id].start, holdings[w.node_id].end)
            elif isinstance(layers, list):
                override = (layers[0], layers[1])
            else:
                override = layers
            nodes.append(NodeCapacity(w.node_id, w.capacity.free_bytes, override))
        return plan_layers(n, self.cost, nodes)

    async def _apply(self, plan: Plan, workers: list[WorkerConn]) -> None:
        by_id = {w.node_id: w for w in workers}
        order = list(plan.assignments)
        plan_id = next(self._plan_ids)
        log.info("plan %d: %s", plan_id, ", ".join(f"{a.node_id}[{a.start},{a.end})" for a in order))
        waits = []
        # A fresh data-plane secret per plan: each stage gets its own keys in its Assign, so
        # even a worker that keeps its weights (a restarted master adopting it) gets one: its
        # old keys belong to a plan nobody serves any more.
        auth = PlanAuth([a.node_id for a in order])
        try:
            for i, a in enumerate(order):
                nxt = by_id[order[i + 1].node_id].grpc_address if i + 1 < len(order) else None
                await self.control.assign(
                    a.node_id,
                    Assign(
                        plan_id=plan_id,
                        model=self.cfg.model,
                        start=a.start,
                        end=a.end,
                        num_layers=plan.num_layers,
                        num_blocks=self.num_blocks,
                        block_size=self.cfg.block_size,
                        dtype=self.cfg.dtype,
                        quant=self.cfg.quant,
                        next_hop=nxt,
                        max_seqs=self.cfg.max_batch,
                        max_tokens=self.cfg.max_batch_tokens,
                        max_context_tokens=self._max_context_tokens(),
                        **wrap_keys(auth.stage_keys(a.node_id), a.node_id, self.control.join_token),
                    ),
                )
                waits.append(a.node_id)
            readies = await asyncio.gather(*(self.control.wait_ready(n, plan_id, self.load_timeout) for n in waits))
        except ControlError as e:
            log.error("plan %d failed: %s; will re-plan", plan_id, e)
            if not self.serves_alone:
                self._unavailable(f"plan failed: {e}")
            elif self.aengine.unavailable:  # a re-plan held requests: serve them alone meanwhile
                self._serve_locally()
            await asyncio.sleep(0.5)
            self.poke()
            return
        for node_id, r in zip(waits, readies):
            self.loads[node_id] = r.loads
        self.loads = {a.node_id: self.loads[a.node_id] for a in order if a.node_id in self.loads}  # no departed rows
        self._standby = set()
        reply_to = self._reply_to(by_id[order[-1].node_id])
        log.info("plan %d: the last stage sends results to %s", plan_id, reply_to)
        self.auth = auth  # before connecting: the ring speaks with this plan's keys
        self._install(self._connect(by_id[order[0].node_id].grpc_address, reply_to))
        self.plan = plan
        log.info("serving through %d stage(s)", len(order))

    def _max_context_tokens(self) -> int:
        """The plan's bound on context tokens per step: the pool, unless sequences share
        prefix blocks; then each of a full batch may reach the longest context."""
        pool = self.num_blocks * self.cfg.block_size
        if not self.cfg.prefix_cache:
            return pool
        return self.cfg.max_batch * min(pool, self.mcfg.max_position)

    def _reply_to(self, last: WorkerConn) -> str:
        """host:port of our result endpoint as the last stage can reach it: --advertise-host,
        else the address its control connection reached us at, else loopback."""
        host = self.advertise_host or last.master_host or "127.0.0.1"
        return f"[{host}]:{self.results.port}" if ":" in host else f"{host}:{self.results.port}"

    def _ring(self, first: str, reply_to: str) -> Runner:
        assert self.auth is not None  # set by _apply just before it connects
        return PipelineRunner(self.local, RingClient(first, self.results, reply_to, self.auth))

    def _install(self, runner: Runner) -> None:
        if self.aengine.attached:
            self.aengine.swap_runner(runner)
        else:
            assert self.make_engine is not None  # only a master that waits for workers starts unattached
            self.aengine.attach(self.make_engine(runner))

    def _serve_locally(self) -> None:
        if not self.serves_alone:
            self._unavailable("no workers connected")
        elif self.plan is not None or self.aengine.unavailable:
            log.info("no workers left: the master takes all layers back")
            self.aengine.swap_runner(self.local)
            self.plan = None

    def _unavailable(self, reason: str) -> None:
        self.plan = None
        self.aengine.set_unavailable(reason)
        log.info("not serving: %s", reason)

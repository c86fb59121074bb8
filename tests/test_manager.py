"""ClusterManager with in-process fakes of its three seams — the control server (who is
connected, assign / ready / adopt), the AsyncEngine (attach, swap, availability) and the
ring (`connect`) — so re-planning, adoption and failure paths run in milliseconds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

from cluster.control_messages import Assign, Capacity, Holding, Ready
from cluster.manager import ClusterManager
from cluster.registry import NodeState
from cluster.worker_conn import LoadFailed
from inference.async_engine import EngineStats
from inference.config import EngineConfig, ModelConfig

GiB = 1 << 30
NUM_LAYERS, NUM_BLOCKS = 4, 64
MCFG = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=NUM_LAYERS,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position=512,
    tie_word_embeddings=True,
)
CFG = EngineConfig(model="tiny", max_batch_tokens=64)


@dataclass
class FakeWorker:
    """The fields of a control-channel connection the manager reads."""

    node_id: str
    holding: Holding | None = None
    free_bytes: int = 8 * GiB
    state: NodeState = NodeState.JOINING
    closed: bool = False
    master_host: str = "127.0.0.1"
    gflops: float = 10.0
    pings: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(rtt_ms=1.0))

    @property
    def grpc_address(self) -> str:
        return f"{self.node_id}.test:50051"

    @property
    def capacity(self) -> Capacity:
        total = max(16 * GiB, self.free_bytes)
        return Capacity(device="cpu", total_bytes=total, free_bytes=self.free_bytes, matmul_gflops=self.gflops)


@dataclass
class FakeControl:
    workers_: list[FakeWorker] = field(default_factory=list)
    assigned: list[Assign] = field(default_factory=list)
    adopted: list[tuple[str, int]] = field(default_factory=list)
    failing: set[str] = field(default_factory=set)  # node ids whose load fails
    assigned_to: list[str] = field(default_factory=list)  # node ids, in the order of `assigned`
    on_assign: Callable[[str], None] = lambda node_id: None
    join_token: str | None = None

    def workers(self) -> list[FakeWorker]:
        return list(self.workers_)

    async def assign(self, node_id: str, msg: Assign) -> None:
        self.assigned.append(msg)
        self.assigned_to.append(node_id)
        self.on_assign(node_id)

    async def wait_ready(self, node_id: str, plan_id: int, timeout: float) -> Ready:
        if node_id in self.failing:
            raise LoadFailed(node_id, f"{node_id}: out of memory")
        return Ready(plan_id=plan_id, load_seconds=0.5, mem_used_bytes=GiB, mem_free_bytes=GiB, loads=1)

    def adopt(self, node_id: str, plan_id: int) -> None:
        self.adopted.append((node_id, plan_id))


class FakeEngine:
    """The AsyncEngine methods the manager calls; swaps take effect at once."""

    def __init__(self, runner: object | None = None):
        self.runner = runner
        self.unavailable: str | None = None
        self.busy = False
        self.swaps: list[object] = []
        self.log: list[str] = []  # availability changes and swaps, in order

    @property
    def attached(self) -> bool:
        return self.runner is not None

    @property
    def ready(self) -> bool:
        return self.attached and self.unavailable is None

    def stats(self) -> EngineStats:
        return EngineStats("tiny", 0, int(self.busy), 0, 0, 0, 0, 0, 0, 512, self.ready)

    def set_unavailable(self, reason: str) -> None:
        self.unavailable = reason
        self.log.append(f"unavailable: {reason}")

    def swap_runner(self, runner: object) -> None:
        self.runner, self.unavailable = runner, None
        self.swaps.append(runner)
        self.log.append("swap")

    def attach(self, engine: SimpleNamespace) -> None:
        self.runner, self.unavailable = engine.runner, None


@dataclass(frozen=True)
class FakeRing:
    first: str
    reply_to: str


def manager(control: FakeControl, engine: FakeEngine, want_workers: int | None = None) -> ClusterManager:
    local = "local-runner"
    if want_workers is None:
        engine.runner = local  # serving alone from the start
    return ClusterManager(
        engine,
        control,
        SimpleNamespace(port=7000, results=0, errors=0),
        CFG,
        MCFG,
        local,
        NUM_BLOCKS,
        want_workers=want_workers,
        make_engine=(lambda runner: SimpleNamespace(runner=runner)) if want_workers else None,
        connect=FakeRing,
    )


def replan(m: ClusterManager) -> None:
    asyncio.run(m._replan())


def holding(start: int, end: int) -> Holding:
    return Holding(
        model="tiny",
        start=start,
        end=end,
        num_layers=NUM_LAYERS,
        num_blocks=NUM_BLOCKS,
        block_size=CFG.block_size,
        dtype="float32",
        loads=3,
    )


def test_a_joining_worker_takes_the_layers_and_they_come_back_when_it_leaves():
    control, engine = FakeControl(), FakeEngine()
    m = manager(control, engine)
    replan(m)
    assert engine.runner == "local-runner" and not control.assigned  # nobody joined: nothing changes
    control.workers_.append(FakeWorker("w1"))
    replan(m)
    (a,) = control.assigned
    assert (a.start, a.end, a.num_layers, a.num_blocks, a.next_hop) == (0, NUM_LAYERS, NUM_LAYERS, NUM_BLOCKS, None)
    assert engine.runner == FakeRing("w1.test:50051", "127.0.0.1:7000") and m.to_json()["mode"] == "pipeline"
    replan(m)
    assert len(control.assigned) == 1  # the same workers: no new plan
    control.workers_.clear()
    replan(m)
    assert engine.runner == "local-runner" and m.plan is None and engine.ready


def test_a_pipeline_master_waits_for_n_workers_then_chains_them():
    control, engine = FakeControl([FakeWorker("w1")]), FakeEngine()
    m = manager(control, engine, want_workers=2)
    replan(m)
    assert not engine.attached and engine.unavailable == "waiting for workers: 1 of 2 connected"
    assert not control.assigned
    control.workers_.append(FakeWorker("w2", master_host="10.1.2.3"))
    replan(m)
    first, second = control.assigned
    assert first.start == 0 and first.end == second.start and second.end == NUM_LAYERS
    assert first.next_hop == "w2.test:50051" and second.next_hop is None
    # The engine is built around the first pipeline; the last stage answers the master at the
    # address its control connection reached.
    assert engine.ready and engine.runner == FakeRing("w1.test:50051", "10.1.2.3:7000")
    assert m.loads == {"w1": 1, "w2": 1}


def test_a_failed_stage_is_replanned_even_with_the_same_workers():
    control, engine = FakeControl([FakeWorker("w1")]), FakeEngine()
    m = manager(control, engine, want_workers=1)
    replan(m)
    plan_ids = [a.plan_id for a in control.assigned]
    engine.set_unavailable("a pipeline stage failed (w1 reset); waiting for the cluster to recover")
    replan(m)
    assert [a.plan_id for a in control.assigned] == plan_ids + [plan_ids[-1] + 1]
    assert engine.ready and isinstance(engine.runner, FakeRing)


def test_a_lost_worker_leaves_a_pipeline_master_waiting():
    control, engine = FakeControl([FakeWorker("w1"), FakeWorker("w2")]), FakeEngine()
    m = manager(control, engine, want_workers=2)
    replan(m)
    control.workers_[1].closed = True
    replan(m)
    assert engine.unavailable == "waiting for workers: 1 of 2 connected" and m.plan is None


def test_a_restarted_master_adopts_workers_that_hold_its_plan():
    """They get the ranges they hold (the worker then keeps its weights) and the new plan's
    data-plane keys: the old ones belong to a plan nobody serves any more."""
    control = FakeControl([FakeWorker("w1", holding(0, 2)), FakeWorker("w2", holding(2, NUM_LAYERS))])
    engine = FakeEngine()
    m = manager(control, engine, want_workers=2)
    replan(m)
    assert [(a.start, a.end) for a in control.assigned] == [(0, 2), (2, NUM_LAYERS)]
    assert all(a.steps_key and a.result_key for a in control.assigned) and engine.ready


def test_holdings_that_do_not_cover_the_model_are_reassigned():
    """w1 holds [0, 1), which no plan over two equal workers keeps: it gets a new range.
    (A worker whose holding equals its new assignment is adopted instead of reloaded.)"""
    control = FakeControl([FakeWorker("w1", holding(0, 1)), FakeWorker("w2")])
    m = manager(control, FakeEngine(), want_workers=2)
    replan(m)
    assert [(a.start, a.end) for a in control.assigned] == [(0, 2), (2, NUM_LAYERS)] and not control.adopted


def test_a_failed_load_marks_a_pipeline_master_unavailable_and_retries():
    control, engine = FakeControl([FakeWorker("w1")], failing={"w1"}), FakeEngine()
    m = manager(control, engine, want_workers=1)
    replan(m)
    assert engine.unavailable is not None and engine.unavailable.startswith("plan failed: w1: out of memory")
    assert m._poke.is_set()  # another attempt is queued


def test_a_master_serving_alone_keeps_serving_when_no_plan_fits():
    control, engine = FakeControl([FakeWorker("w1", free_bytes=1024)]), FakeEngine()
    m = manager(control, engine)
    replan(m)
    assert m.plan_error and not control.assigned and engine.ready and engine.runner == "local-runner"


def test_the_plan_changes_only_between_requests():
    control, engine = FakeControl(), FakeEngine()
    m = manager(control, engine)
    engine.busy = True
    control.workers_.append(FakeWorker("w1"))
    replan(m)
    assert not control.assigned and m._poke.is_set()  # deferred, not dropped
    engine.busy = False
    replan(m)
    assert len(control.assigned) == 1


# ---- a worker that joins a serving cluster ----


def test_a_spare_worker_stands_by_when_the_cluster_has_its_n_workers_and_steps_in_when_needed():
    control, engine = FakeControl([FakeWorker("w1"), FakeWorker("w2")]), FakeEngine()
    m = manager(control, engine, want_workers=2)
    replan(m)
    assert control.assigned_to == ["w1", "w2"] and engine.ready
    runner = engine.runner
    control.workers_.append(FakeWorker("w3", gflops=1000.0))  # even a much faster one
    replan(m)
    assert control.assigned_to == ["w1", "w2"] and engine.runner is runner and engine.log == []  # no reload
    assert m.to_json()["standby"] == ["w3"] and [a.node_id for a in m.plan.assignments] == ["w1", "w2"]
    control.workers_[0].closed = True  # a stage is lost: the standby is the replacement
    engine.set_unavailable("a pipeline stage failed (w1 reset)")
    replan(m)
    assert control.assigned_to[2:] == ["w2", "w3"] and engine.ready and m.to_json()["standby"] == []
    assert set(m.loads) == {"w2", "w3"}  # the departed stage's row is gone


def test_a_pipeline_master_uses_more_than_n_workers_only_when_n_cannot_hold_the_model():
    need_all = FakeWorker("w1", free_bytes=2**20)  # room for 2 of the 4 layers
    control, engine = FakeControl([need_all, FakeWorker("w2", free_bytes=2**20), FakeWorker("w3")]), FakeEngine()
    m = manager(control, engine, want_workers=1)
    replan(m)
    assert control.assigned_to == ["w1", "w2"] and engine.ready and m.to_json()["standby"] == ["w3"]


def test_serving_alone_a_joining_worker_replans_only_for_a_predicted_gain(caplog):
    caplog.set_level("INFO", logger="cluster")
    slow = FakeWorker("slow", gflops=0.01)
    control, engine = FakeControl([slow]), FakeEngine()
    m = manager(control, engine)
    replan(m)
    assert control.assigned_to == ["slow"] and isinstance(engine.runner, FakeRing)
    engine.log.clear()
    control.workers_.append(FakeWorker("twin", gflops=0.01))  # as slow: one more hop, no gain
    replan(m)
    assert control.assigned_to == ["slow"] and engine.log == [] and m.to_json()["standby"] == ["twin"]
    assert "worker(s) twin stand by: a plan with it is predicted" in caplog.text
    control.workers_.remove(control.workers_[1])
    control.workers_.append(FakeWorker("fast", gflops=100.0, free_bytes=24 * GiB))  # takes 3 of the 4 layers
    replan(m)
    assert control.assigned_to[1:] == ["slow", "fast"] and [(a.start, a.end) for a in control.assigned[1:]] == [
        (0, 1),
        (1, NUM_LAYERS),
    ]
    # The engine held new requests before the first stage was told to reload, and serves again after.
    assert engine.log[0].startswith("unavailable: re-planning") and engine.log[-1] == "swap" and engine.ready
    assert "re-planning: a plan with fast, slow is predicted" in caplog.text


def test_a_join_replan_waits_for_running_requests_before_reloading_the_stages():
    control, engine = FakeControl([FakeWorker("slow", gflops=0.01)]), FakeEngine()
    m = manager(control, engine)
    replan(m)

    async def main():
        engine.busy = True  # a request is running on the current stages
        control.workers_.append(FakeWorker("fast", gflops=100.0, free_bytes=24 * GiB))
        task = asyncio.create_task(m._replan())
        await asyncio.sleep(0.3)
        assert engine.unavailable and engine.unavailable.startswith("re-planning")  # new requests wait
        assert control.assigned_to == ["slow"]  # the running one still has its stages
        engine.busy = False
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert control.assigned_to[1:] == ["slow", "fast"] and engine.ready


def test_a_failed_join_replan_serving_alone_falls_back_to_the_local_model():
    control, engine = FakeControl([FakeWorker("slow", gflops=0.01)]), FakeEngine()
    m = manager(control, engine)
    replan(m)
    control.workers_.append(FakeWorker("fast", gflops=100.0, free_bytes=24 * GiB))
    control.failing.add("fast")
    replan(m)
    assert engine.runner == "local-runner" and engine.ready and m.plan is None  # held requests run locally

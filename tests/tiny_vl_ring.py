"""A Qwen2-VL pipeline over real gRPC on loopback: stage s1 [0, 1) → stage s2 [1, 2) → the
master's result endpoint. The master holds the embedding, the vision tower and the head;
the stages are built without the embedding, so they never see a pixel."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from cluster.data_auth import PlanAuth
from cluster.pipeline import PipelineRunner
from cluster.ring import ResultServer, RingClient
from cluster.stage_server import StageServicer, serve, stage_limits
from inference.config import EngineConfig, LayerRange
from inference.engine import Engine
from inference.loader import load_model
from inference.model_runner import ModelRunner

MAX_SEQS, MAX_TOKENS = 8, 32


@contextmanager
def vl_ring(path: Path, num_blocks: int, block: int) -> Iterator[Engine]:
    """A pipeline Engine over the tiny Qwen2-VL in `path` (2 decoder layers, one per stage)."""
    n = 2
    plan = PlanAuth(["s1", "s2"])
    results = ResultServer(None)
    reply_to = f"127.0.0.1:{results.start('127.0.0.1', 0)}"
    stages, servers, next_hop = [], [], None
    for node, (a, b) in reversed(list(zip(plan.stages, [(0, 1), (1, 2)]))):
        loaded = load_model(str(path), layers=LayerRange(a, b, n, embed=False, head=False))
        assert getattr(loaded.model, "visual", None) is None
        servicer = StageServicer(node)
        servicer.tls = None
        limits = stage_limits(loaded, num_blocks, block, MAX_SEQS, MAX_TOKENS)
        servicer.install(loaded, num_blocks, block, "float32", next_hop, keys=plan.stage_keys(node), limits=limits)
        server, port = serve(servicer, "127.0.0.1", 0)
        stages.append(servicer)
        servers.append(server)
        next_hop = f"127.0.0.1:{port}"
    ends = load_model(str(path), layers=LayerRange(0, 0, n, embed=True, head=True))
    local = ModelRunner(ends.model, ends.config, ends.layers, num_blocks, block, torch.float32, "cpu")
    assert next_hop is not None
    runner = PipelineRunner(local, RingClient(next_hop, results, reply_to, plan, timeout=30))
    cfg = EngineConfig(model=str(path), max_batch=MAX_SEQS, block_size=block, max_batch_tokens=MAX_TOKENS)
    engine = Engine(cfg, loaded=ends, num_blocks=num_blocks, runner=runner)
    try:
        yield engine
    finally:
        runner.close()
        for servicer in stages:
            servicer.drop()
        for server in servers:
            server.stop(grace=None)
        results.stop()

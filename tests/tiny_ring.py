"""An in-process ring over real gRPC on loopback, for the data-plane and TLS tests: stage s1
[0, 2) → stage s2 [2, 4) of a tiny model → the master's result endpoint, driven by a pipeline
Engine; `expected` is the single-process greedy answer to `prompts`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import torch

from cluster.data_auth import PlanAuth
from cluster.pipeline import PipelineRunner
from cluster.ring import ResultServer, RingClient
from cluster.stage_server import StageServicer, serve, stage_limits
from cluster.tls import ClusterCA, NodeTLS, check_issued, make_csr, new_key
from inference.config import EngineConfig, LayerRange, SamplingParams
from inference.engine import Engine
from inference.loader import load_model
from inference.model_runner import ModelRunner

from .tiny_models import IdTokenizer, make_tiny

NUM_BLOCKS, BLOCK, MAX_SEQS, MAX_TOKENS = 64, 16, 8, 64  # a pool of 1,024 tokens
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def worker_tls(ca: ClusterCA, node_id: str) -> NodeTLS:
    """What a worker holds once `ca` has certified a fresh key of its own."""
    key = new_key()
    return check_issued(key, ca.sign(make_csr(key, node_id), node_id), ca.ca_pem)


@contextmanager
def tiny_ring(
    path: str,
    ca: ClusterCA | None = None,
    max_context_tokens: int | None = NUM_BLOCKS * BLOCK,
    backends: tuple[str, str] = ("torch", "torch"),
) -> Iterator[SimpleNamespace]:
    """The ring in folder `path` (a tiny model is written there); every hop mutual TLS
    certified by `ca` when one is given, plaintext otherwise. The stages accept at most
    `max_context_tokens` over a step's sequences (None: as many as sequences sharing
    prefixes can reach). `backends` runs each stage on torch or MLX (inference.mlx)."""
    make_tiny("llama-untied", path)
    cfg = EngineConfig(model=path, max_batch=MAX_SEQS, block_size=BLOCK, max_batch_tokens=MAX_TOKENS)
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9, 3)]
    expected = [g[0] for g in Engine(cfg, tokenizer=IdTokenizer(), num_blocks=NUM_BLOCKS).generate(prompts, GREEDY)]

    plan = PlanAuth(["s1", "s2"])
    results = ResultServer(ca.node_tls("master") if ca else None)
    reply_to = f"127.0.0.1:{results.start('127.0.0.1', 0)}"
    stages, servers, next_hop = {}, [], None
    for node, (a, b), backend in reversed(list(zip(plan.stages, [(0, 2), (2, 4)], backends))):
        rng, runner = LayerRange(a, b, 4, embed=False, head=False), None
        if backend == "mlx":
            from inference.mlx.runner import MLXRunner

            runner = MLXRunner.load(path, "float32", rng, NUM_BLOCKS, BLOCK)
            loaded = runner.loaded
        else:
            loaded = load_model(path, layers=rng)
        servicer = StageServicer(node)
        servicer.tls = worker_tls(ca, node) if ca else None
        limits = stage_limits(loaded, NUM_BLOCKS, BLOCK, MAX_SEQS, MAX_TOKENS, max_context_tokens)
        keys = plan.stage_keys(node)
        servicer.install(loaded, NUM_BLOCKS, BLOCK, "float32", next_hop, runner, keys=keys, limits=limits)
        creds = servicer.tls.server_credentials() if servicer.tls else None
        server, port = serve(servicer, "127.0.0.1", 0, creds)
        stages[node], next_hop = servicer, f"127.0.0.1:{port}"
        servers.append(server)
    ends = load_model(path, layers=LayerRange(0, 0, 4, embed=True, head=True))
    local = ModelRunner(ends.model, ends.config, ends.layers, NUM_BLOCKS, BLOCK, torch.float32, "cpu")
    runner = PipelineRunner(local, RingClient(next_hop, results, reply_to, plan, timeout=30))
    engine = Engine(cfg, loaded=ends, tokenizer=IdTokenizer(), num_blocks=NUM_BLOCKS, runner=runner)
    try:
        yield SimpleNamespace(
            ca=ca,
            plan=plan,
            results=results,
            reply_to=reply_to,
            first=next_hop,
            stages=stages,
            engine=engine,
            prompts=prompts,
            expected=expected,
        )
    finally:
        runner.close()
        for servicer in stages.values():
            servicer.drop()
        for server in servers:
            server.stop(grace=None)
        results.stop()

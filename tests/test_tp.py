"""Tensor parallelism: N ranks (gloo on CPU) give the logits and tokens of one process.

The in-process tests make this pytest process rank 0 of a TP group for the length of one
test (the group is always closed again, so later tests build plain single-process models)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from cluster.pipeline import PipelineRunner
from cluster.ring import ResultServer, RingClient
from inference.config import EngineConfig, LayerRange, ModelConfig, SamplingParams
from inference.distributed import check_tp, shard_range, tp_size, valid_tp_sizes
from inference.engine import Engine
from inference.errors import UnsupportedModel
from inference.kv_cache import KVCacheManager
from inference.loader import load_model
from inference.model_runner import ModelRunner
from inference.scheduler import ScheduledSeq
from inference.sequence import Sequence
from inference.tp_runner import start_tp, tp_engine
from tests.tiny_models import IdTokenizer, make_tiny

from .conftest import STAGE_SECRET, stage_plan, start_stage

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


# -- pure parts ------------------------------------------------------------------------------
def test_valid_sizes_and_messages():
    assert valid_tp_sizes(9, 3) == [1, 3, 9]  # the default model
    assert valid_tp_sizes(4, 2) == [1, 2, 4]  # 4 replicates each KV head on two ranks
    assert valid_tp_sizes(12, 4) == [1, 2, 4, 12]  # 3 and 6: KV heads neither split nor replicate
    smol = ModelConfig("LlamaForCausalLM", 49152, 576, 1536, 30, 9, 3, 64, 1e-5, 1e4, 2048, True)
    check_tp(smol, 3)
    check_tp(smol, 9)
    with pytest.raises(UnsupportedModel, match=r"9 attention heads do not divide by 2; --tp can be 1, 3, 9"):
        check_tp(smol, 2)
    gqa = ModelConfig("LlamaForCausalLM", 256, 64, 128, 2, 12, 4, 16, 1e-5, 1e4, 512, True)
    with pytest.raises(UnsupportedModel, match=r"4 KV heads neither divide by 6"):
        check_tp(gqa, 6)


def test_shard_ranges_cover_everything_once():
    for total, n in [(1536, 9), (128, 2), (7, 3)]:
        ranges = [shard_range(total, r, n) for r in range(n)]
        assert ranges[0][0] == 0 and sum(size for _, size in ranges) == total
        assert all(a[0] + a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


# -- TP N vs TP 1 logits on tiny models ----------------------------------------------------------
def run_steps(runner) -> torch.Tensor:
    """Prefill 11 tokens in two chunks, then 6 cached greedy decode steps; all logits."""
    kv = KVCacheManager(64, 4)
    prompt = torch.randint(0, 256, (11,), generator=torch.Generator().manual_seed(1)).tolist()
    seq = Sequence(prompt, SamplingParams(temperature=0))
    out = []
    for n in (7, 4, 1, 1, 1, 1, 1, 1):
        kv.allocate(seq, seq.num_computed_tokens + n)
        inputs = runner.prepare([ScheduledSeq(seq, n)])
        hidden = runner.forward(inputs)
        inputs.sample_rows = list(range(n))  # every position's logits, not just the last
        logits = runner.logits(inputs, hidden)
        seq.num_computed_tokens += n
        if seq.num_computed_tokens >= len(prompt):
            seq.append_token(int(logits[-1].argmax()))
        out.append(logits)
    return torch.cat(out)


@pytest.mark.parametrize(
    "kind,tp",
    [("llama-tied", 2), ("qwen2", 2), ("llama-untied", 4)],
    ids=["llama-tied-tp2", "qwen2-tp2", "llama-untied-tp4-replicated-kv"],
)
def test_tp_logits_match_single_process(tmp_path, kind, tp):
    make_tiny(kind, tmp_path)
    one = load_model(str(tmp_path))
    ref = run_steps(ModelRunner(one.model, one.config, one.layers, 64, 4, torch.float32, "cpu"))
    runner = start_tp(str(tmp_path), "float32", "cpu", None, 64, 4, tp)
    try:
        assert tp_size() == tp
        # Each rank holds only its share: 1/tp of the heads (KV heads replicated past 2).
        attn = runner.loaded.model.model.layers[0].self_attn
        assert attn.num_heads == 4 // tp and attn.num_kv_heads == max(1, 2 // tp)
        got = run_steps(runner)
    finally:
        runner.close()
    assert tp_size() == 1
    assert [p.poll() is not None for p in runner.ranks.procs] == [True] * (tp - 1)  # STOP ended them
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < TOL


def test_each_rank_reads_only_its_shard(tmp_path, monkeypatch):
    """Weight loaders get a lazy safetensors slice and cut this rank's rows/columns out of it."""
    from safetensors import safe_open

    from inference.layers import linear

    make_tiny("llama-untied", tmp_path)  # hidden 64, intermediate 128, 4 heads of 16, 2 KV heads
    monkeypatch.setattr(linear, "tp_size", lambda: 4)
    monkeypatch.setattr(linear, "tp_rank", lambda: 3)  # the last of 4 ranks
    down = linear.RowParallelLinear(128, 64)
    gate_up = linear.MergedColumnParallelLinear(64, [128, 128])
    qkv = linear.QKVParallelLinear(64, 16, 4, 2, bias=False)
    assert (qkv.num_heads, qkv.num_kv_heads) == (1, 1)  # 2 KV heads over 4 ranks: replicated
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as sf:

        def both(name):
            return sf.get_slice(f"model.layers.0.{name}.weight"), sf.get_tensor(f"model.layers.0.{name}.weight")

        sl, full = both("mlp.down_proj")
        down.weight_loader(down.weight, sl)
        assert torch.equal(down.weight, full[:, 96:])
        for shard, name in enumerate(("mlp.gate_proj", "mlp.up_proj")):
            sl, full = both(name)
            gate_up.weight_loader(gate_up.weight, sl, shard)
            assert torch.equal(gate_up.weight[32 * shard : 32 * (shard + 1)], full[96:])
        for shard, name, rows in (
            ("q", "self_attn.q_proj", slice(48, 64)),
            ("k", "self_attn.k_proj", slice(16, 32)),
            ("v", "self_attn.v_proj", slice(16, 32)),
        ):
            sl, full = both(name)
            qkv.weight_loader(qkv.weight, sl, shard)
            at = {"q": 0, "k": 16, "v": 32}[shard]
            assert torch.equal(qkv.weight[at : at + 16], full[rows])  # rank 3: Q head 3, KV head 1


# -- the default model ----------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_tp3_greedy_equals_tp1():
    cfg = EngineConfig(kv_cache_gb=0.1, max_batch=4)
    single = Engine(cfg)
    prompts = [
        single.encode_chat([{"role": "user", "content": q}])
        for q in ("What is the capital of France?", "Name three colours.")
    ]
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    expected = single.generate(prompts, greedy)
    tp3 = tp_engine(EngineConfig(kv_cache_gb=0.1, max_batch=4, tp=3), tokenizer=single.tokenizer)
    try:
        got = tp3.generate(prompts, greedy)
    finally:
        tp3.runner.close()
    assert [g[0] for g in got] == [e[0] for e in expected]
    assert tp3.kv.num_used_blocks == 0


@pytest.mark.slow
def test_bad_tp_on_the_default_model_is_refused_before_loading():
    r = subprocess.run(
        [sys.executable, "app.py", "--tp", "2", "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert lines[-1] == (
        "error: --tp 2 cannot split this model: its 9 attention heads do not divide by 2; --tp can be 1, 3, 9"
    )
    assert "loading" not in r.stderr  # refused from the config alone: no weight was read


def test_bad_tp_on_a_stage_is_refused(tmp_path):
    make_tiny("llama-tied", tmp_path)  # 4 heads, 2 KV heads
    r = subprocess.run(
        [sys.executable, "-m", "cluster.stage_server", "--model", str(tmp_path), "--layers", "0", "4", "--tp", "3"],
        cwd=ROOT,
        env=dict(os.environ, RINGLLM_SECRET=STAGE_SECRET),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "error: --tp 3 cannot split this model: its 4 attention heads do not divide by 3; --tp can be 1, 2, 4"
    )


# -- PP 2 x TP 2 on loopback -----------------------------------------------------------------------
NUM_BLOCKS, BLOCK = 64, 4


@pytest.mark.slow
def test_pipeline_of_two_tp2_stages_equals_single_process(tmp_path):
    make_tiny("llama-untied", tmp_path)
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9, 14, 3)]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    cfg = EngineConfig(model=str(tmp_path), max_batch=8, block_size=BLOCK, max_batch_tokens=16)
    expected = Engine(cfg, tokenizer=IdTokenizer(), num_blocks=NUM_BLOCKS).generate(prompts, greedy)

    stage = dict(model=str(tmp_path), tp=2, num_blocks=NUM_BLOCKS, block_size=BLOCK)
    second, addr2 = start_stage(2, 4, **stage)
    first, addr1 = start_stage(0, 2, next_hop=addr2, **stage)
    results = ResultServer()
    try:
        port = results.start("127.0.0.1", 0)
        ends = load_model(str(tmp_path), layers=LayerRange(0, 0, 4, embed=True, head=True))
        local = ModelRunner(ends.model, ends.config, ends.layers, NUM_BLOCKS, BLOCK, torch.float32, "cpu")
        piped = Engine(
            cfg,
            loaded=ends,
            tokenizer=IdTokenizer(),
            num_blocks=NUM_BLOCKS,
            runner=PipelineRunner(
                local, RingClient(addr1, results, f"127.0.0.1:{port}", stage_plan((0, 2), (2, 4)), timeout=30)
            ),
        )
        got = piped.generate(prompts, greedy)  # 4 at once, chunked prefills mixed with decodes
        piped.runner.close()
        assert [g[0] for g in got] == [e[0] for e in expected]
        ranks = [c for p in (first, second) for c in psutil.Process(p.pid).children()]
        assert len(ranks) == 2  # one extra rank per stage
    finally:
        results.stop()
        for p in (first, second):
            p.kill()  # SIGKILL: no STOP is sent, the ranks must notice on their own
            p.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, "TP ranks outlived their killed rank 0"

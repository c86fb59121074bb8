"""The MLX backend against our torch model on tiny random checkpoints: float32 logits within
1e-4 over a chunked prefill and cached decode steps, whole and split into stages, and
continuous batching: several requests at once give the greedy tokens each gets alone."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'mlx[cpu]')")

from inference.config import EngineConfig, LayerRange, SamplingParams  # noqa: E402
from inference.engine import Engine  # noqa: E402
from inference.kv_cache import KVCacheManager  # noqa: E402
from inference.loader import load_model  # noqa: E402
from inference.mlx.runner import MLXRunner  # noqa: E402
from inference.model_runner import ModelRunner  # noqa: E402
from inference.scheduler import ScheduledSeq  # noqa: E402
from inference.sequence import Sequence  # noqa: E402

from .tiny_models import IdTokenizer, make_tiny  # noqa: E402

TOL = 1e-4
DECODE_STEPS = 12
NUM_BLOCKS, BLOCK = 64, 4
KINDS = ["llama-tied", "llama3-rope-scaling", "qwen2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """One tiny checkpoint per family, written once for the module."""
    paths = {}
    for kind in KINDS:
        path = tmp_path_factory.mktemp(kind)
        make_tiny(kind, path)
        paths[kind] = str(path)
    return paths


class Chain:
    """Stages run back to back by hand over one block table (the master's), each with its own cache."""

    def __init__(self, runners, kv: KVCacheManager):
        self.runners, self.kv = runners, kv

    def step(self, seq: Sequence, n: int) -> torch.Tensor:
        """Run n new tokens of seq; the logits of those n positions."""
        self.kv.allocate(seq, seq.num_computed_tokens + n)
        inputs = self.runners[0].prepare([ScheduledSeq(seq, n)])
        hidden = None
        for r in self.runners:
            hidden = r.forward(inputs, hidden)
        seq.num_computed_tokens += n
        inputs.sample_rows = list(range(n))
        return self.runners[-1].logits(inputs, hidden)


def torch_chain(path: str) -> Chain:
    loaded = load_model(path)
    runner = ModelRunner(loaded.model, loaded.config, loaded.layers, NUM_BLOCKS, BLOCK, torch.float32, "cpu")
    return Chain([runner], KVCacheManager(NUM_BLOCKS, BLOCK))


def mlx_chain(path: str, ranges) -> Chain:
    return Chain(
        [MLXRunner.load(path, "float32", r, NUM_BLOCKS, BLOCK) for r in ranges], KVCacheManager(NUM_BLOCKS, BLOCK)
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("split", [None, 1], ids=["whole", "split1"])
def test_logits_match_torch(tiny, kind, split):
    path = tiny[kind]
    ranges = [(0, 4)] if split is None else [(0, split), (split, 4)]
    ref, ours = torch_chain(path), mlx_chain(path, ranges)
    prompt = torch.randint(0, 256, (11,), generator=torch.Generator().manual_seed(1)).tolist()
    seqs = [Sequence(prompt, SamplingParams(temperature=0)) for _ in range(2)]
    # Prefill in two chunks, so cached-context attention is exercised too.
    for n in (7, 4):
        a, b = ref.step(seqs[0], n), ours.step(seqs[1], n)
        assert (a - b).abs().max().item() < TOL
    for _ in range(DECODE_STEPS):
        tok = int(a[-1].argmax())
        for s in seqs:
            s.append_token(tok)
        a, b = ref.step(seqs[0], 1), ours.step(seqs[1], 1)
        assert (a - b).abs().max().item() < TOL


def mlx_engine(path: str, max_batch: int) -> Engine:
    cfg = EngineConfig(model=path, max_batch=max_batch, block_size=BLOCK, max_batch_tokens=32)
    runner = MLXRunner.load(path, "float32", None, NUM_BLOCKS, BLOCK)
    return Engine(cfg, loaded=runner.loaded, tokenizer=IdTokenizer(), num_blocks=NUM_BLOCKS, runner=runner)


@pytest.mark.parametrize("kind", ["llama-tied", "qwen2"])
def test_concurrent_requests_equal_one_at_a_time(tiny, kind):
    """Mixed prefill chunks and padded decodes in one step give each request its own answer."""
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (3, 17, 9, 40, 1)]
    engine = mlx_engine(tiny[kind], max_batch=8)
    alone = [engine.generate([p], greedy)[0][0] for p in prompts]
    together = [g[0] for g in engine.generate(prompts, greedy)]
    assert together == alone
    # and the torch engine agrees token for token
    ref = Engine(EngineConfig(model=tiny[kind], block_size=BLOCK), tokenizer=IdTokenizer(), num_blocks=NUM_BLOCKS)
    assert [g[0] for g in ref.generate(prompts, greedy)] == alone


def test_seeded_sampling_matches_torch(tiny):
    """The sampler is the engine's own: a seeded top-k/top-p request draws the same tokens."""
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True)
    prompt = list(range(5, 25))
    path = tiny["llama-tied"]
    ref = Engine(EngineConfig(model=path, block_size=BLOCK), tokenizer=IdTokenizer(), num_blocks=NUM_BLOCKS)
    assert mlx_engine(path, 4).generate([prompt], params)[0][0] == ref.generate([prompt], params)[0][0]


def test_layer_range_reads_only_its_layers(tiny):
    runner = MLXRunner.load(tiny["qwen2"], "float32", LayerRange(1, 3, 4, embed=False, head=False), 8, BLOCK)
    assert len(runner.model.model.layers) == 2
    assert "embed_tokens" not in runner.model.model and "lm_head" not in runner.model


def test_status_shows_the_mlx_backend(tiny):
    from cluster.local_node import MasterNode
    from inference.async_engine import AsyncEngine
    from inference.mlx.engine import mlx_engine

    engine = mlx_engine(EngineConfig(model=tiny["qwen2"], kv_cache_gb=0.01), tokenizer=IdTokenizer())
    node = MasterNode(AsyncEngine(engine, "tiny"), "here").info()
    assert (node.backend, node.device) == ("mlx", "cpu")
    assert engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0][2] == "length"


def test_wire_dtypes_convert_exactly():
    """Hidden states arrive and leave in the plan's dtype; bfloat16 crosses numpy as bits."""
    from inference.mlx.convert import to_mx, to_torch

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = torch.randn(5, 7).to(dtype)
        back = to_torch(to_mx(t))
        assert back.dtype == dtype and torch.equal(back, t)


def test_quantized_weights_stay_close(tiny):
    """--quant int8/int4 swap in MLX's quantized layers; int8 barely moves the logits."""
    import mlx.nn as nn

    path = tiny["llama-tied"]
    prompt = list(range(3, 40))
    out = {}
    for quant in ("none", "int8", "int4"):
        runner = MLXRunner.load(path, "float32", None, NUM_BLOCKS, BLOCK, quant)
        assert runner.loaded.quant == quant
        layers = [m for _, m in runner.model.named_modules() if isinstance(m, nn.QuantizedLinear)]
        assert bool(layers) == (quant != "none")
        out[quant] = Chain([runner], KVCacheManager(NUM_BLOCKS, BLOCK)).step(Sequence(prompt, SamplingParams()), 37)
    scale = out["none"].abs().max().item()
    assert (out["int8"] - out["none"]).abs().max().item() < 0.02 * scale
    assert (out["int4"] - out["none"]).abs().max().item() < 0.3 * scale


def save_mlx_quantized(src: str, dst, bits: int = 4, group: int = 64) -> None:
    """`src` as an MLX-community style checkpoint: HF names, each matrix as packed `weight`
    plus `scales`/`biases`, and `quantization` in config.json (what mlx-lm's convert writes)."""
    import json
    from pathlib import Path

    import mlx.core as mx
    from safetensors import safe_open

    src_dir, dst_dir = Path(src), Path(dst)
    out = {}
    with safe_open(str(src_dir / "model.safetensors"), framework="numpy") as sf:
        for name in sf.keys():
            a = mx.array(sf.get_tensor(name))
            if name.endswith(".weight") and a.ndim == 2:
                stem = name.removesuffix("weight")
                out[name], out[stem + "scales"], out[stem + "biases"] = mx.quantize(a, group, bits)
            else:
                out[name] = a
    mx.save_safetensors(str(dst_dir / "model.safetensors"), out)
    cfg = json.loads((src_dir / "config.json").read_text())
    (dst_dir / "config.json").write_text(json.dumps(dict(cfg, quantization=dict(group_size=group, bits=bits))))


def test_mlx_format_quantized_checkpoint_loads_as_it_is(tiny, tmp_path):
    import mlx.core as mx
    import mlx.nn as nn

    from inference.mlx.loader import load_stage

    save_mlx_quantized(tiny["qwen2"], tmp_path)
    stored = MLXRunner.load(str(tmp_path), "float32", None, NUM_BLOCKS, BLOCK)
    assert stored.loaded.quant == "int4"
    assert isinstance(stored.model.model.embed_tokens, nn.QuantizedEmbedding)
    # the float model quantized here the same way gives the same logits
    same = load_stage(tiny["qwen2"])
    nn.quantize(same.model, 64, 4)
    mx.eval(same.model.parameters())  # here: MLX evaluates lazy arrays only on the thread that made them
    prompt = list(range(7, 30))
    a, b = (
        Chain([r], KVCacheManager(NUM_BLOCKS, BLOCK)).step(Sequence(prompt, SamplingParams()), len(prompt))
        for r in (stored, MLXRunner(same, NUM_BLOCKS, BLOCK))
    )
    assert (a - b).abs().max().item() < 1e-5


def test_backend_flags(monkeypatch, capsys):
    import app
    import inference.mlx as backend
    from cluster import worker

    assert backend.resolve_backend("auto") == ("mlx" if backend.apple_silicon() else "torch")
    with pytest.raises(ValueError, match="serves alone"):
        app.master_config(app.build_parser().parse_args(["--backend", "mlx", "--workers", "1"]))
    with pytest.raises(ValueError, match="--backend mlx"):  # adapters need the MLX backend
        app.master_config(app.build_parser().parse_args(["--backend", "torch", "--adapter", "x"]))
    assert worker.main(["--master", "http://127.0.0.1:1", "--backend", "mlx", "--tp", "2"]) == 2
    monkeypatch.setattr(backend, "available", lambda: False)
    assert worker.main(["--master", "http://127.0.0.1:1", "--backend", "mlx"]) == 2
    assert "pip install" in capsys.readouterr().err


def test_bfloat16_stage_takes_and_returns_the_wire_dtype(tiny):
    """A stage of a bfloat16 plan: bf16 hidden states in, bf16 out, close to float32."""
    path, rng = tiny["llama-tied"], LayerRange(1, 4, 4, embed=False, head=False)
    seq = Sequence(list(range(3, 20)), SamplingParams())
    KVCacheManager(NUM_BLOCKS, BLOCK).allocate(seq, 17)
    hidden = torch.randn(17, 64)
    out = {}
    for dtype in ("float32", "bfloat16"):
        runner = MLXRunner.load(path, dtype, rng, NUM_BLOCKS, BLOCK)
        inputs = runner.prepare([ScheduledSeq(seq, 17)])
        out[dtype] = runner.forward(inputs, hidden.to(getattr(torch, dtype)))
    assert out["bfloat16"].dtype == torch.bfloat16
    assert (out["bfloat16"].float() - out["float32"]).abs().max().item() < 0.05 * out["float32"].abs().max().item()


def test_int4_keeps_q4_1_codes():
    """Weights on a Q4_1 grid (min + d * q per 32-wide group, as a GGUF dequantizes to) come
    back exactly from our int4 codes; mx.quantize's zero-exact grid would re-round them."""
    import mlx.core as mx

    from inference.mlx.quant import minmax_quantize

    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (8, 4, 32), generator=gen)
    codes[..., 0], codes[..., 1] = 0, 15  # llama.cpp's d = (max - min) / 15: both ends are used
    d, m = torch.rand(8, 4, 1, generator=gen) * 0.1 + 0.01, torch.randn(8, 4, 1, generator=gen) * 0.1
    w = mx.array((m + d * codes).reshape(8, 128).numpy())
    packed, scales, biases = minmax_quantize(w, 32, 4)
    back = mx.dequantize(packed, scales, biases, group_size=32, bits=4)
    assert mx.abs(back - w).max().item() < 1e-6

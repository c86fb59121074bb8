"""Quantized weights: the kernel choice per CPU, each packed format against its float
reference, exact Q4_1 codes, and quantized models end to end (tiny and the default one)."""

from __future__ import annotations

import pytest
import torch

from inference import kernels
from inference.config import EngineConfig, SamplingParams
from inference.engine import Engine, kv_pool_blocks
from inference.layers.linear import MergedColumnParallelLinear
from inference.layers.quant import (
    AMX_DENSE_ROWS,
    INT4_GROUP,
    FbgemmInt8,
    Int4Pack,
    Int8Pack,
    PackableWeight,
    QuantSpec,
    choose,
    has_fbgemm,
    pack,
)
from inference.layers.quant_native import amx_tiles
from inference.loader import load_model, resolve_quant
from inference.model_runner import kv_cache_dtype
from tests.tiny_models import IdTokenizer, make_tiny

AMX = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8"})
ZEN4 = frozenset({"avx2", "avx512f", "avx512_bf16"})
ZEN3 = frozenset({"avx2", "fma", "f16c"})


def test_the_kernel_follows_the_cpu():
    assert choose("none", "cpu", AMX, True) is None
    assert choose("int4", "cpu", AMX, True) == QuantSpec("int4", "int4pack", "int8pack", dense_rows=AMX_DENSE_ROWS)
    assert choose("int8", "cpu", AMX, True) == QuantSpec("int8", "int8pack", "int8pack", dense_rows=AMX_DENSE_ROWS)
    assert choose("int4", "cpu", ZEN4, True) == QuantSpec("int4", "int4pack", "int8pack")  # no AMX: no bf16 copy
    # AVX2 only: the pack kernels have no fast path there; fbgemm's int8 serves both formats.
    assert choose("int4", "cpu", ZEN3, True) == QuantSpec("int4", "fbgemm", "fbgemm")
    assert choose("int8", "cpu", ZEN3, False) == QuantSpec("int8", "int8pack", "int8pack")
    with pytest.raises(ValueError, match="CPU only"):
        choose("int8", "cuda:0", AMX, True)


def test_auto_keeps_a_gguf_quantized_on_cpu_only(tmp_path):
    assert resolve_quant("auto", "smollm2", "cpu") == "int4"  # a Q4_1 file
    assert resolve_quant("auto", "smollm2", "cuda") == "none"
    make_tiny("llama-tied", tmp_path)
    assert resolve_quant("auto", str(tmp_path), "cpu") == "none"  # float safetensors stay float
    assert resolve_quant("int8", str(tmp_path), "cpu") == "int8"


def q4_1_weight(out_f: int, in_f: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight as llama.cpp's Q4_1 stores it: per block of 32, w = d * q + m (d, m fp16)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_f, in_f), generator=g)
    q[:, ::INT4_GROUP] = 0  # every block uses its full code range, as llama.cpp's rounding does
    q[:, 1::INT4_GROUP] = 15
    d = (torch.rand(out_f, in_f // INT4_GROUP, generator=g) * 0.02 + 0.001).half().float()
    m = (torch.randn(out_f, in_f // INT4_GROUP, generator=g) * 0.05).half().float()
    w = q.float() * d.repeat_interleave(INT4_GROUP, 1) + m.repeat_interleave(INT4_GROUP, 1)
    return w, q


def test_int4_recovers_q4_1_codes_exactly():
    w, q = q4_1_weight(96, 128)
    p = Int4Pack(w)
    deq = p.dequantized()
    sz = p.scales_zeros.float()  # [groups, out, 2]
    scale = sz[..., 0].t().repeat_interleave(INT4_GROUP, 1)
    zero = sz[..., 1].t().repeat_interleave(INT4_GROUP, 1)
    codes = ((deq - zero) / scale + 8).round()
    assert torch.equal(codes.long(), q)
    # Only the bf16 scale and zero round: the weights stay within a fraction of a step.
    assert (deq - w).abs().max() < 0.02 * w.abs().max()


@pytest.mark.parametrize("cls", [Int8Pack, Int4Pack, FbgemmInt8])
def test_packed_matmul_matches_its_dequantized_weight(cls):
    if cls is FbgemmInt8 and not has_fbgemm():
        pytest.skip("this torch build has no fbgemm")
    torch.manual_seed(0)
    w = torch.randn(192, 256) * 0.05
    x = torch.randn(5, 256)
    p = cls(w)
    ref = x @ p.dequantized().t()
    got = p(x)
    assert got.dtype == x.dtype and got.shape == (5, 192)
    # bf16 activations (pack kernels) or int8 activations (fbgemm) cost a little precision.
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()
    step = 0.1 if cls is Int4Pack else 0.02  # within about half a quantization step of the float weight
    assert (p.dequantized() - w).abs().max() < step * w.abs().max()


def test_from_16_rows_an_amx_layer_multiplies_by_its_bf16_copy():
    torch.manual_seed(0)
    w = torch.randn(64, 96) * 0.05
    layer = MergedColumnParallelLinear(96, [64], quant=QuantSpec("int4", "int4pack", "int8pack", dense_rows=16))
    layer.weight.data.copy_(w)
    layer.process_weights_after_loading()
    assert layer.weight is None and layer.packed is not None and layer.dense_copy is not None
    x = torch.randn(16, 96)
    assert torch.equal(layer(x[:15]), layer.packed(x[:15]))  # few rows: the int4 kernel
    assert torch.equal(layer(x), torch.nn.functional.linear(x.bfloat16(), w.bfloat16()).float())


def test_big_models_skip_the_bf16_copies_and_the_tiles(tmp_path, monkeypatch):
    import psutil

    make_tiny("llama-untied", tmp_path)
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=1024))
    loaded = load_model(str(tmp_path), quant="int4")
    layers = [m for m in loaded.model.modules() if isinstance(m, PackableWeight)]
    assert all(m.dense_copy is None and getattr(m.packed, "tiles", None) is None for m in layers)
    monkeypatch.undo()
    if kernels.load() and amx_tiles():  # with room, this machine's layers carry tile records
        loaded = load_model(str(tmp_path), quant="int4")
        layers = [m for m in loaded.model.modules() if isinstance(m, PackableWeight)]
        assert all(getattr(m.packed, "tiles", None) is not None for m in layers)


def test_int4_falls_back_to_int8_for_a_width_it_cannot_group():
    assert isinstance(pack(torch.randn(16, 48), "int4pack"), Int8Pack)  # 48 columns: no groups of 32
    assert isinstance(pack(torch.randn(8, 64), "int4pack"), Int8Pack)  # 8 rows: no tiles of 16
    assert isinstance(pack(torch.randn(16, 64), "int4pack"), Int4Pack)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_a_quantized_tiny_model_tracks_the_float_one(tmp_path, quant):
    make_tiny("llama-untied", tmp_path)
    loaded = load_model(str(tmp_path), quant=quant)
    packed = [m for m in loaded.model.modules() if isinstance(m, PackableWeight)]
    assert len(packed) == 4 * 4 + 1 and all(m.weight is None for m in packed)  # float copies dropped
    assert loaded.quant == quant
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (6, 11)]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    cfg = EngineConfig(model=str(tmp_path), max_batch=4, kv_cache_gb=0.01)
    ref = Engine(cfg, tokenizer=IdTokenizer()).generate(prompts, greedy)
    got = Engine(cfg, loaded=loaded, tokenizer=IdTokenizer()).generate(prompts, greedy)
    assert all(len(g[0]) == 8 for g in got)
    # A random tiny model has near-flat logits, so only the first token is a fair check.
    assert [g[0][0] for g in got] == [r[0][0] for r in ref]


@pytest.mark.slow
def test_the_default_model_quantized_still_answers():
    for quant in ("int8", "int4"):
        engine = Engine(EngineConfig(kv_cache_gb=0.1, max_batch=2, quant=quant))
        ids = engine.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
        (_, text, _) = engine.generate([ids], SamplingParams(temperature=0, max_tokens=16))[0]
        assert "Paris" in text, (quant, text)
        # ... with its keys and values in bf16: twice the blocks in the same budget.
        assert engine.runner.kv_caches[0][0].dtype == torch.bfloat16
        mcfg, n = engine.loaded.config, engine.loaded.config.num_layers
        assert engine.kv.pool.num_blocks == kv_pool_blocks(engine.cfg, mcfg, n, quant=quant)
        assert engine.kv.pool.num_blocks >= 2 * kv_pool_blocks(engine.cfg, mcfg, n)


def test_which_kv_caches_are_bf16():
    assert kv_cache_dtype(torch.float32, "cpu", "int4") == torch.bfloat16
    assert kv_cache_dtype(torch.float32, "cpu", "int8") == torch.bfloat16
    assert kv_cache_dtype(torch.float32, "cpu", "none") == torch.float32  # float weights: exact parity
    assert kv_cache_dtype(torch.float32, "cuda:0", "int4") == torch.float32
    assert kv_cache_dtype(torch.float16, "cpu", "int4") == torch.float16

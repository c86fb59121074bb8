"""The fused CPU kernels (inference/csrc/cpu_ops.cpp) against the torch code they replace:
each op over dtypes, shapes that take the inline and the threaded paths and head sizes with
and without the vector path; the paged decode attention against gather + SDPA over random
block tables; bounds checks on everything a peer sends; whole-model logits with and without
the kernels; and a failed build falling back to torch ops with a warning, not an error."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from inference import kernels
from inference.layers.rotary import apply_rotary

ROOT = Path(__file__).resolve().parents[1]

# CI's machine has a compiler: there a missing build is a failure, not a skip.
if os.environ.get("CI") and platform.system() == "Linux":
    assert kernels.load(), "the fused CPU kernels did not build"
pytestmark = pytest.mark.skipif(not kernels.load(), reason="fused CPU kernels unavailable (no C++ compiler?)")

DTYPES = [torch.float32, torch.bfloat16]


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    # float32: the order of a sum; bf16: one rounding step of the output.
    atol, rtol = (2e-6, 2e-6) if dtype == torch.float32 else (1e-2, 1e-2)
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("rows", [1, 17])
@pytest.mark.parametrize("vocab", [5, 49153])
def test_argmax_is_torchs_ties_nans_and_infinities_included(rows, vocab):
    torch.manual_seed(vocab + rows)
    x = torch.randn(rows, vocab)
    x[0, vocab // 3] = x[0, -1] = 9.0  # a tie: the first index wins, as in torch
    if rows > 1:
        x[1] = float("-inf")  # all -inf: index 0
        x[2, vocab // 2] = x[2, -1] = float("nan")  # a NaN wins; the first one
        x[3, -1] = float("inf")  # in the tail past the last 16 columns
    x[-1, 0] = 50.0
    got = torch.ops.ringllm.argmax(x)
    assert got.dtype == torch.int64
    assert torch.equal(got, x.argmax(dim=-1))
    assert torch.equal(kernels.argmax(x[:, ::2]), x[:, ::2].argmax(dim=-1))  # not contiguous
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.ringllm.argmax(x.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_norms(dtype, rows):
    torch.manual_seed(rows)
    x, res, w = torch.randn(rows, 576, dtype=dtype), torch.randn(rows, 576, dtype=dtype), torch.randn(576, dtype=dtype)
    close(torch.ops.ringllm.rms_norm(x, w, 1e-5), F.rms_norm(x, (576,), w, 1e-5), dtype)
    y = x.clone()
    normed = torch.ops.ringllm.add_rms_norm_(y, res, w, 1e-5)
    assert torch.equal(y, x + res)  # the residual stream: exactly torch's add
    close(normed, F.rms_norm(x + res, (576,), w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 16, 200])
def test_silu_mul(dtype, rows):
    torch.manual_seed(rows)
    x = torch.randn(rows, 2 * 1536, dtype=dtype) * 6
    x[0, :4] = torch.tensor([-200.0, 200.0, -90.0, 90.0])  # past both ends of the exp's range
    gate, up = x.chunk(2, dim=-1)
    close(torch.ops.ringllm.silu_mul(x), F.silu(gate) * up, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 5, 200])
def test_rope_kv_matches_and_fills_the_cache(dtype, tokens):
    torch.manual_seed(tokens)
    h, kv, d = 6, 2, 64
    qkv = torch.randn(tokens, h + 2 * kv, d, dtype=dtype)
    cos_sin = torch.randn(tokens, 2, d, dtype=dtype)
    k_cache, v_cache = torch.zeros(20, 16, kv, d, dtype=dtype), torch.zeros(20, 16, kv, d, dtype=dtype)
    slots = torch.randperm(320)[:tokens]
    want = apply_rotary(qkv[:, : h + kv], (cos_sin[:, :1], cos_sin[:, 1:]))
    got = qkv.clone()
    torch.ops.ringllm.rope_kv(got, cos_sin, k_cache, v_cache, slots, h, kv)
    assert torch.equal(got[:, : h + kv], want)  # the same roundings as torch's ops, exactly
    assert torch.equal(got[:, h + kv :], qkv[:, h + kv :])
    assert torch.equal(k_cache.view(-1, kv, d)[slots], want[:, h:])
    assert torch.equal(v_cache.view(-1, kv, d)[slots], qkv[:, h + kv :])


def reference_decode(q, k_cache, v_cache, tables, ctx_lens):
    out = []
    for i, n in enumerate(ctx_lens):
        rows = (tables[i, :, None] * k_cache.shape[1] + torch.arange(k_cache.shape[1])).flatten()[:n]
        k = k_cache.flatten(0, 1)[rows].transpose(0, 1).float()
        v = v_cache.flatten(0, 1)[rows].transpose(0, 1).float()
        out.append(F.scaled_dot_product_attention(q[i].float()[:, None], k, v, enable_gqa=True)[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,seqs",
    # Query heads a KV head: 3, 1, 7 (a pass of 4, then 3), 4 at 128 wide (2 + 2), 2; 40: no vector path.
    [(9, 3, 64, 1), (9, 3, 64, 20), (4, 4, 128, 3), (14, 2, 64, 5), (8, 2, 128, 3), (4, 2, 64, 2), (6, 2, 40, 4)],
)
def test_decode_attention_matches_sdpa_over_random_tables(dtype, heads, kv_heads, head_dim, seqs):
    torch.manual_seed(heads * seqs)
    block, blocks = 16, 96
    k_cache = torch.randn(blocks, block, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.randn(blocks, block, kv_heads, head_dim, dtype=dtype)
    ctx = [1, 16, 17, 300, 33][:seqs] + torch.randint(1, 400, (max(0, seqs - 5),)).tolist()
    width = -(-max(ctx) // block) + 2  # padded past every table, as the runner pads
    tables = torch.stack([torch.randperm(blocks)[:width] for _ in range(seqs)])
    qkv = torch.randn(seqs, heads + 2 * kv_heads, head_dim, dtype=dtype)
    q = qkv[:, :heads]  # a strided view, as the model passes it
    got = torch.ops.ringllm.decode_attention(q, k_cache, v_cache, tables, ctx, head_dim**-0.5)
    want = reference_decode(q, k_cache, v_cache, tables, ctx)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=atol)


def test_prompts_on_the_decode_kernel_match_sdpa(monkeypatch):
    """Short prompt chunks are attended by the decode kernel, one query a token over the cache
    that already holds them; in one step with a decode, a fresh prompt, and a later chunk of
    a prompt whose start is cached. SDPA, a call per chunk, is the reference."""
    from inference.layers import attention

    torch.manual_seed(0)
    h, kv, d, block, blocks = 9, 3, 64, 16, 32
    q_lens, ctx_lens = [1, 37, 30], [40, 37, 50]
    tables = torch.stack([torch.randperm(blocks)[:4] for _ in q_lens])
    k_cache, v_cache = torch.randn(blocks, block, kv, d), torch.randn(blocks, block, kv, d)
    positions = [(i, p) for i, (n, c) in enumerate(zip(q_lens, ctx_lens)) for p in range(c - n, c)]
    slots = torch.tensor([int(tables[i, p // block]) * block + p % block for i, p in positions])
    q = torch.randn(len(slots), h, d)
    k, v = k_cache.view(-1, kv, d)[slots], v_cache.view(-1, kv, d)[slots]  # this step's keys: in the cache
    layer = attention.Attention(h, kv, d, layer_idx=0)

    def run() -> torch.Tensor:
        meta = attention.build_metadata(slots, tables, q_lens, ctx_lens, num_decodes=1, block_size=block)
        return layer(q, k, v, meta, (k_cache, v_cache))

    got = run()
    monkeypatch.setattr(attention, "ROWS_MAX_CTX", 0)  # every prompt through SDPA
    torch.testing.assert_close(got, run(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
def test_a_narrower_cache_under_float32_activations(cache_dtype):
    # Quantized weights on CPU keep keys and values in bf16 (model_runner.kv_cache_dtype): the
    # kernels write them rounded as torch's .to() rounds, and read them back as floats.
    torch.manual_seed(0)
    h, kv, d, tokens = 6, 2, 64, 5
    qkv = torch.randn(tokens, h + 2 * kv, d)
    cos_sin = torch.randn(tokens, 2, d)
    k_cache, v_cache = torch.zeros(20, 16, kv, d, dtype=cache_dtype), torch.zeros(20, 16, kv, d, dtype=cache_dtype)
    slots = torch.randperm(320)[:tokens]
    rotated = qkv.clone()
    torch.ops.ringllm.rope_kv(rotated, cos_sin, k_cache, v_cache, slots, h, kv)
    assert torch.equal(rotated[:, : h + kv], apply_rotary(qkv[:, : h + kv], (cos_sin[:, :1], cos_sin[:, 1:])))
    assert torch.equal(k_cache.view(-1, kv, d)[slots], rotated[:, h : h + kv].to(cache_dtype))
    assert torch.equal(v_cache.view(-1, kv, d)[slots], qkv[:, h + kv :].to(cache_dtype))
    for head_dim in (64, 40):  # the vector path and the generic one
        k_cache = torch.randn(40, 16, kv, head_dim).to(cache_dtype)
        v_cache = torch.randn(40, 16, kv, head_dim).to(cache_dtype)
        ctx = [1, 17, 300]
        tables = torch.stack([torch.randperm(40)[:20] for _ in ctx])
        q = torch.randn(len(ctx), h, head_dim)
        got = torch.ops.ringllm.decode_attention(q, k_cache, v_cache, tables, ctx, head_dim**-0.5)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, reference_decode(q, k_cache, v_cache, tables, ctx), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="does not go with"):  # only under float32 activations
        torch.ops.ringllm.decode_attention(q.bfloat16(), k_cache.half(), v_cache.half(), tables, ctx, 0.125)


def test_bad_indices_from_a_peer_are_errors_not_memory_accesses():
    k_cache, v_cache = torch.zeros(4, 16, 2, 64), torch.zeros(4, 16, 2, 64)
    q = torch.zeros(1, 4, 64)
    for tables, ctx in [
        (torch.tensor([[0, 9]]), [20]),  # block id past the cache
        (torch.tensor([[-1]]), [3]),  # negative block id
        (torch.tensor([[0]]), [17]),  # context longer than the table
        (torch.tensor([[0]]), [0]),
    ]:
        with pytest.raises(RuntimeError):
            torch.ops.ringllm.decode_attention(q, k_cache, v_cache, tables, ctx, 0.125)
    qkv, cos_sin = torch.zeros(1, 8, 64), torch.zeros(1, 2, 64)
    for slot in (64 * 2, -1):
        with pytest.raises(RuntimeError, match="out of range"):
            torch.ops.ringllm.rope_kv(qkv, cos_sin, k_cache, v_cache, torch.tensor([slot]), 4, 2)
    with pytest.raises(RuntimeError):  # shapes that do not fit
        torch.ops.ringllm.rms_norm(torch.zeros(2, 8), torch.zeros(9), 1e-5)


def test_model_logits_with_and_without_kernels(tmp_path):
    """The tiny Llama over a prefill and cached decodes of three sequences at once: the same
    logits from the kernels as from torch's ops (also where the step mixes the two)."""
    from inference.config import SamplingParams
    from inference.kv_cache import KVCacheManager
    from inference.loader import load_model
    from inference.model_runner import ModelRunner
    from inference.scheduler import ScheduledSeq
    from inference.sequence import Sequence
    from tests.tiny_models import make_tiny

    make_tiny("llama-untied", tmp_path)
    loaded = load_model(str(tmp_path))

    def run() -> list[torch.Tensor]:
        kv = KVCacheManager(num_blocks=64, block_size=4)
        runner = ModelRunner(loaded.model, loaded.config, loaded.layers, 64, 4, torch.float32, "cpu")
        seqs = [Sequence(list(range(3 + 5 * i, 14 + 7 * i)), SamplingParams()) for i in range(3)]
        out = []
        for step in range(8):
            # Step 0 prefills one prompt, step 1 decodes it while prefilling the others.
            active = seqs[:1] if step == 0 else seqs
            batch = []
            for s in active:
                n = 1 if s.num_computed_tokens else s.num_prompt_tokens
                kv.allocate(s, s.num_computed_tokens + n)
                batch.append(ScheduledSeq(s, n))
            inputs = runner.prepare(batch)
            hidden = runner.forward(inputs)
            out.append(loaded.model.compute_logits(hidden))
            for item in batch:
                item.seq.num_computed_tokens += item.num_new_tokens
                if item.seq.num_computed_tokens >= item.seq.num_prompt_tokens:
                    item.seq.output_token_ids.append(7 + step)
        return out

    native = run()
    with kernels.torch_ops_only():
        reference = run()
    for a, b in zip(native, reference):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_failed_build_falls_back_to_torch_ops(tmp_path):
    """No working compiler: the process logs why and runs on torch ops; nothing half-built
    is left where a later start would load it."""
    env = dict(os.environ, RINGLLM_CACHE=str(tmp_path), CXX="false", PYTHONPATH=str(ROOT))
    code = "import logging; logging.basicConfig(); from inference import kernels; print(kernels.load())"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stderr
    assert "torch ops only" in p.stderr
    assert not list(tmp_path.rglob("*.so"))

"""Our integer matmul kernels (inference/csrc/quant_ops.cpp) against the same arithmetic
written in torch: activations rounded to int8 per block of 32, codes times codes, one scale
per block. Every path is covered: the 16-row groups and the rows after them, the 4-block
chunks and a shorter last one, 1 to 9 activation rows (row tiles of 4 and their remainder),
bf16 input; plus exact Q4_1 codes, the kernel choice, and clear errors for bad shapes."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inference import kernels
from inference.layers.linear import MergedColumnParallelLinear
from inference.layers.quant import (
    INT4_GROUP,
    NATIVE_DENSE_ROWS,
    Q4Native,
    Q8Native,
    QuantSpec,
    avx2,
    choose,
    pack,
    vnni,
)
from inference.layers.quant_native import amx_tiles
from tests.test_quant import AMX, ZEN3, ZEN4, q4_1_weight

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not kernels.load(), reason="compiled kernels unavailable (no C++ compiler?)")

SPR = AMX | {"avx512_vnni", "avx512bw"}
ZEN4_VNNI = ZEN4 | {"avx512_vnni", "avx512bw"}


def rounded_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels see it: each block of 32 values (the last may be shorter) rounded to
    int8 steps of max|x| / 127."""
    x = x.float()
    out = torch.empty_like(x)
    for lo in range(0, x.shape[1], INT4_GROUP):
        blk = x[:, lo : lo + INT4_GROUP]
        scale = blk.abs().amax(dim=1, keepdim=True) / 127
        out[:, lo : lo + INT4_GROUP] = torch.where(scale > 0, torch.round(blk / scale.clamp(min=1e-30)) * scale, 0.0)
    return out


def reference(p: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    w = p.dequantized().double()
    if isinstance(p, Q4Native):  # the min term takes the activations' exact block sums
        mins = p.mins.t().double().repeat_interleave(INT4_GROUP, 1)
        return (rounded_activations(x).double() @ (w - mins).t() + x.double() @ mins.t()).float()
    return (rounded_activations(x).double() @ w.t()).float()


def assert_matches(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    # float32: only the order of the float sums differs; bf16: the output's own rounding.
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (got.float() - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("cls", [Q4Native, Q8Native])
@pytest.mark.parametrize("shape", [(48, 576), (576, 96), (40, 160), (16, 32)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
def test_kernel_matches_the_same_arithmetic_in_torch(cls, shape, rows):
    # 576 = 4 full chunks + 2 blocks; 96, 160: shorter chunks only or a 1-block tail; 40 rows:
    # two groups of 16 and 8 rows after them.
    torch.manual_seed(rows)
    w = torch.randn(*shape) * 0.05
    x = torch.randn(rows, shape[1])
    p = cls(w)
    got = p(x)
    assert got.shape == (rows, shape[0]) and got.dtype == torch.float32
    assert_matches(got, reference(p, x), torch.float32)


@pytest.mark.parametrize("cls", [Q4Native, Q8Native])
def test_bf16_input_and_extra_dims(cls):
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    x = torch.randn(2, 3, 128).bfloat16()
    p = cls(w)
    got = p(x)
    assert got.shape == (2, 3, 64) and got.dtype == torch.bfloat16
    assert_matches(got.reshape(6, 64), reference(p, x.reshape(6, 128)), torch.bfloat16)


def test_q8_widths_that_are_not_a_multiple_of_the_block():
    torch.manual_seed(0)
    w = torch.randn(33, 100) * 0.05  # a 4-value last block, 17 rows past the group
    x = torch.randn(3, 100)
    p = Q8Native(w)
    assert_matches(p(x), reference(p, x), torch.float32)


def test_zero_rows_and_a_constant_block():
    w = torch.zeros(16, 64)
    w[:, 32:] = 0.25  # one block all equal: scale 0, every code 0, the min carries it
    x = torch.zeros(2, 64)
    x[1] = 1.0
    p = Q4Native(w)
    torch.testing.assert_close(p.dequantized(), w)
    assert torch.equal(p(x)[0], torch.zeros(16))  # zero activations: a zero scale, no NaN
    torch.testing.assert_close(p(x)[1], torch.full((16,), 8.0))


def test_q4_keeps_q4_1_codes_scales_and_mins_exactly():
    w, q = q4_1_weight(96, 128)
    p = Q4Native(w)
    codes = p.codes.reshape(96, 4, 16)
    got = torch.cat([codes & 15, codes >> 4], dim=-1).reshape(96, 128)
    assert torch.equal(got.long(), q)
    assert torch.equal(p.dequantized(), w)  # float16 scale and min: nothing rounds


def test_the_native_kernels_need_avx2_and_the_library():
    # AMX: the tiles take prompts too (csrc/quant_amx_bf16.cpp), so no bf16 copy.
    assert choose("int4", "cpu", SPR, True, native=True) == QuantSpec("int4", "q4native", "q8native", tiles=True)
    no_amx_int8 = choose("int4", "cpu", SPR - {"amx_int8"}, True, native=True)
    assert no_amx_int8 == QuantSpec("int4", "q4native", "q8native", NATIVE_DENSE_ROWS)
    assert choose("int8", "cpu", ZEN4_VNNI, True, native=True) == QuantSpec("int8", "q8native", "q8native")
    assert choose("int4", "cpu", ZEN3, True, native=True) == QuantSpec("int4", "q4native", "q8native")  # AVX2
    assert choose("int4", "cpu", SPR, True, native=False).kernel == "int4pack"  # library not built
    assert choose("int4", "cpu", ZEN3, True, native=False).kernel == "fbgemm"
    assert choose("int4", "cpu", frozenset({"sse4_2"}), False, native=True).kernel == "int8pack"  # neither
    assert vnni(SPR) and not vnni(AMX) and avx2(ZEN3)
    assert isinstance(pack(torch.randn(16, 48), "q4native"), Q8Native)  # 48 columns: no blocks of 32
    assert isinstance(pack(torch.randn(24, 64), "q4native"), Q4Native)  # any height


def test_bad_shapes_are_errors_not_crashes():
    p = Q4Native(torch.randn(32, 64))
    with pytest.raises(RuntimeError, match=r"activations \[rows, 64\]"):
        torch.ops.ringllm.q4_linear(torch.randn(1, 32), p.codes, p.scales, p.mins)
    with pytest.raises(RuntimeError, match="q4 mins"):
        torch.ops.ringllm.q4_linear(torch.randn(1, 64), p.codes, p.scales, p.mins.t().contiguous())
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.ringllm.q4_linear(torch.randn(1, 64).double(), p.codes, p.scales, p.mins)
    q = Q8Native(torch.randn(32, 64))
    with pytest.raises(RuntimeError, match="q8 scale"):
        torch.ops.ringllm.q8_linear(torch.randn(1, 64), q.codes, q.scale[:16])


AMX_TILES = kernels.loaded() and amx_tiles()


@pytest.mark.skipif(not AMX_TILES, reason="no AMX-INT8 here (or RINGLLM_AMX=off)")
@pytest.mark.parametrize("cls", [Q4Native, Q8Native])
@pytest.mark.parametrize("rows", [4, 16, 17, 23])
def test_batches_on_amx_tiles_match_one_row_at_a_time(cls, rows):
    # From 4 to 23 rows the kernels multiply the weight's tile copy (csrc/quant_amx.cpp); one
    # row at a time they read the codes with VNNI. Same rounding of the activations: only the
    # order of the float sums may differ. 2560 columns: 80 blocks (an even count), 96: 3 (odd).
    torch.manual_seed(rows)
    for shape in ((80, 2560), (1600, 96)):
        p = cls(torch.randn(*shape) * 0.05)
        assert p.tiles is not None and p.tiles.shape[:2] == (shape[0] // 16, shape[1] // 32)
        x = torch.randn(rows, shape[1])
        for xs, dtype in ((x, torch.float32), (x.bfloat16(), torch.bfloat16)):
            one_by_one = torch.cat([p(xs[i : i + 1]) for i in range(rows)]).float()
            assert_matches(p(xs), one_by_one, dtype)
    assert cls(torch.randn(40, 96)).tiles is None  # 40 rows: not whole tiles; VNNI serves it


@pytest.mark.skipif(not AMX_TILES, reason="no AMX here (or RINGLLM_AMX=off)")
@pytest.mark.parametrize("cls", [Q4Native, Q8Native])
@pytest.mark.parametrize("rows", [24, 40, 97, 300])
def test_prompts_on_amx_tiles_multiply_bf16_weights(cls, rows):
    # From 24 rows the tiles multiply bf16 activations by the weights dequantized to bf16
    # (csrc/quant_amx_bf16.cpp): what a bf16 copy of the weights gave, with float32 sums.
    # (int8-rounded activations are off by ~1% of the output here.) 97 rows: an 80-row pass
    # and a 17-row one; 300: torch's bf16 matmul on the dequantized weight (bf16 output).
    torch.manual_seed(rows)
    for shape in ((80, 2560), (1600, 96)):
        p = cls(torch.randn(*shape) * 0.05)
        x = torch.randn(rows, shape[1])
        want = x.bfloat16().float() @ p.dequantized().bfloat16().float().T
        for xs, dtype in ((x, torch.float32), (x.bfloat16(), torch.bfloat16)):
            got = p(xs)
            assert got.dtype == dtype
            assert_matches(got, want, dtype if rows < 256 else torch.bfloat16)


def test_a_layer_calls_the_kernel_straight_from_matmul():
    torch.manual_seed(0)
    layer = MergedColumnParallelLinear(96, [64], quant=QuantSpec("int4", "q4native", "q8native"))
    layer.weight.data.normal_()
    layer.process_weights_after_loading()
    assert layer.native_call is not None and layer.native_call[0] == torch.ops.ringllm.q4_linear.default
    x = torch.randn(3, 96)
    assert torch.equal(layer(x), layer.packed(x))


AVX2_CHECK = """
import sys, torch
from inference import kernels
kernels.CFLAGS = [f for f in kernels.CFLAGS if not f.startswith("-march")] + ["-march=haswell"]
# Only what the quantized matmuls link against: a smaller build (this test is the suite's slowest).
kernels.SOURCES = [s for s in kernels.SOURCES if s.name not in ("decode_layer.cpp", "argmax.cpp")]
assert kernels.load()
from inference.layers.quant import Q4Native, Q8Native
from tests.test_quant_native import reference
torch.manual_seed(0)
for cls in (Q4Native, Q8Native):
    for shape in ((48, 576), (40, 1536), (32, 160)):
        for rows in (1, 3, 5):
            p, x = cls(torch.randn(*shape) * 0.05), torch.randn(rows, shape[1])
            want = reference(p, x)
            assert (p(x) - want).abs().max() <= 1e-5 * want.abs().max(), (cls.__name__, shape, rows)
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64", reason="an x86 build")
def test_the_avx2_build_matches_too(tmp_path):
    """A CPU with AVX-512 never runs the AVX2 loops (AMD Zen 3's): build the library for AVX2
    only, in a process of its own, and check them against the same reference."""
    env = dict(os.environ, RINGLLM_CACHE=str(tmp_path), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-c", AVX2_CHECK]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]

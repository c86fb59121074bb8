"""Quantized weights for the linear layers and the LM head, with the CPU kernel chosen by
what the processor has.

Formats (`--quant`):
- int4: 4-bit codes in groups of 32 input columns, each group with its own scale and
  zero (w = (q - 8) * scale + zero), which is llama.cpp's Q4_1 block exactly (scale = d,
  zero = m + 8d), so a Q4_1 GGUF's codes come back unchanged.
- int8: 8-bit codes with one symmetric scale per output row.
The LM head is always int8 when quantizing (llama.cpp keeps it at Q8_0 too).

Kernels, measured on a loop of only the default model's matmuls at batch 1 (2 cores; whole
decode steps add per-op overhead on top, see bench/decode.py). Where our library built
(inference/kernels.py) and the CPU has AVX512-VNNI or AVX2, our own kernels run both
formats (`q4native`, `q8native`: layers/quant_native.py, csrc/quant_ops.cpp): activations
rounded to int8 per block of 32 and multiplied in integers, as llama.cpp does (Intel Xeon
with AMX: the layers' matmuls
7.2 ms a token against 9.6 with int4pack, the LM head 1.6 ms against 2.9; the same Xeon with
the library built for AVX2 only decodes 105 tok/s where fbgemm, the AVX2 choice before, gave
60). Without the library, on a CPU with native bf16
(AVX512-BF16 or AMX) `torch._weight_int4pack_mm_for_cpu` and `torch._weight_int8pack_mm` with
bf16 activations are the fast ones (Intel Xeon with AMX: fp32 dense 56 "tok/s", int8pack 112,
int4pack 153; the same ops with fp32 activations are 5-10x slower). On AVX2 only, both have no
fast path (Zen 3: int8pack 13, int4pack 7 against fp32 dense 19) and fbgemm's dynamic int8
(`quantized::linear_dynamic`, 82 there) is used for both formats. These are torch core ops:
torchao's weight-only CPU paths dispatch to the same two pack kernels.

Both pack kernels are batch-invariant (a row's result does not depend on the other rows), but
rounding activations to bf16 turns attention's last-bit differences between batch shapes into
visible ones, so a quantized model's greedy reply can change with what it is batched with."""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .gemm import dense
from .quant_native import INT4_GROUP, NativeCall, Q4Native, Q8Native, amx_tiles, int4_blocks, row_int8, row_scales

log = logging.getLogger(__name__)

KERNELS = ("dense", "int8pack", "int4pack", "fbgemm", "q4native", "q8native")
AMX_DENSE_ROWS = 6
# Our kernels read 4-bit codes where the bf16 copy reads 2 bytes a weight: in a whole decode
# step (the default model, 2 cores, AMX) they stay ahead up to ~16 rows (16 sequences: 423-473
# tok/s against 392-403), even at 32, and behind from 48 (366-460 against 481-537).
NATIVE_DENSE_ROWS = 24
# (With AMX our kernels need no copy: tiles take 4 rows and more, csrc/quant_amx.cpp, and from
# 24 rows multiply bf16 activations by weights dequantized to bf16 as the copy would hold
# them, csrc/quant_amx_bf16.cpp. The default model's 30 layers, 2 cores: 16 rows 10-12 ms
# where the copy took 23-29, 89 rows 28-31 against 37-43.)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(flags: frozenset[str]) -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def vnni(flags: frozenset[str]) -> bool:
    """AVX512-VNNI (with the byte ops it needs): our integer kernels' fastest path."""
    return {"avx512_vnni", "avx512bw"} <= flags


def avx2(flags: frozenset[str]) -> bool:
    """AVX2 with FMA and F16C: our integer kernels' 8-lane path (e.g. AMD Zen 3)."""
    return {"avx2", "fma", "f16c"} <= flags


def has_fbgemm() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


@dataclass(frozen=True, slots=True)
class QuantSpec:
    """How a stage's linear layers hold their weights: `kind` is the format asked for
    ("int8" or "int4"); `kernel` what runs it on this machine, `head_kernel` the LM head's."""

    kind: str
    kernel: str
    head_kernel: str
    # From this many rows on (prefill, batches) multiply by a bf16 copy of the weight: on AMX
    # bf16 reads more bytes but the int kernels' cost grows with the rows (3072x576, 2 cores:
    # 1 row int4 76 us, bf16 196; 4 rows 140 vs 146; 8 rows 276 vs 185; 16 rows 543 vs 202;
    # 256 rows 8.2 ms vs 1.3). Costs the bf16 copy's memory.
    dense_rows: int | None = None
    # Our kernels' weights also carry AMX tile records (quant_native.tile_records), which
    # batches of 4 rows and more multiply (csrc/quant_amx.cpp; prompts csrc/quant_amx_bf16.cpp).
    # Costs ~0.6 byte a 4-bit weight, 1 byte an 8-bit one, and replaces the bf16 copy.
    tiles: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("int8", "int4") or self.kernel not in KERNELS or self.head_kernel not in KERNELS:
            raise ValueError(f"bad quantization {self}")


def choose(
    kind: str, device: str, flags: frozenset[str] | None = None, fbgemm: bool | None = None, native: bool = False
) -> QuantSpec | None:
    """The spec for `kind` ("none", "int8" or "int4") on this machine; None means float
    weights. `native`: our compiled kernels are loaded (inference/kernels.py). Pure given
    `flags` and `fbgemm` (the tests pass them)."""
    if kind == "none":
        return None
    if not device.startswith("cpu"):
        raise ValueError(f"--quant {kind} runs on CPU only for now; use --quant none on {device}")
    flags = cpu_flags() if flags is None else flags
    fbgemm = has_fbgemm() if fbgemm is None else fbgemm
    amx = "amx_bf16" in flags
    if native and (vnni(flags) or avx2(flags)):
        tiles = {"amx_int8", "amx_bf16", "avx512_bf16"} <= flags  # the tiles take prompts too: no copy
        dense = NATIVE_DENSE_ROWS if amx and not tiles else None
        return QuantSpec(kind, "q4native" if kind == "int4" else "q8native", "q8native", dense, tiles)
    dense_rows = AMX_DENSE_ROWS if amx else None
    if native_bf16(flags):
        return QuantSpec(kind, "int4pack" if kind == "int4" else "int8pack", "int8pack", dense_rows)
    if fbgemm:  # AVX2: the pack kernels have no fast path; fbgemm's int8 does
        return QuantSpec(kind, "fbgemm", "fbgemm")
    return QuantSpec(kind, "int8pack", "int8pack")  # correct everywhere, if not fast


def describe(spec: QuantSpec | None) -> str:
    if spec is None:
        return "float weights"
    flags = cpu_flags()
    if spec.kernel.endswith("native"):
        why = "AVX512-VNNI" if vnni(flags) else "AVX2"
    else:
        why = "native bf16" if native_bf16(flags) else "no native bf16"
    dense = f", bf16 copy from {spec.dense_rows} rows" if spec.dense_rows else ""
    tiles = ", AMX tiles from 4 rows (bf16 from 24)" if spec.tiles and amx_tiles() else ""
    return f"{spec.kind} weights, {spec.kernel} kernel, LM head {spec.head_kernel}{tiles}{dense} ({why})"


class Int8Pack(nn.Module):
    """Symmetric per-row int8 weights for `torch._weight_int8pack_mm` (bf16 activations)."""

    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        codes, scale = row_int8(weight)
        self.register_buffer("qweight", codes)
        self.register_buffer("scale", scale.to(torch.bfloat16))

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self.scale).to(x.dtype)


class Int4Pack(nn.Module):
    """Asymmetric 4-bit weights in groups of 32 for `torch._weight_int4pack_mm_for_cpu`
    (bf16 activations, so scales and zeros are bf16 too)."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor

    def __init__(self, weight: torch.Tensor, group: int = INT4_GROUP):
        super().__init__()
        out_f, in_f = weight.shape
        w, lo, hi = int4_blocks(weight, group)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        # Codes from the group's minimum: a Q4_1 block's own codes come back exactly.
        codes = ((w - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(out_f, in_f)
        self.group = group
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(codes, 2))
        # [in/group, out, 2]: per group and output row, (scale, zero) with w = (q - 8) * scale + zero.
        zeros = torch.stack([scale, lo + 8 * scale], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_zeros", zeros.to(torch.bfloat16))
        self.shape = (out_f, in_f)

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by, as float32 (for tests and quality checks)."""
        eye = torch.eye(self.shape[1], dtype=torch.bfloat16)
        return torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, self.scales_zeros).float().t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, self.group, self.scales_zeros)
        return y.to(x.dtype)


class FbgemmInt8(nn.Module):
    """fbgemm's prepacked int8 weights with dynamic per-batch activation quantization (fp32)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float()
        scale = row_scales(w).double()
        with warnings.catch_warnings():  # deprecated in favour of torchao, whose CPU int8 is the pack kernel
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
        self._packed = torch.ops.quantized.linear_prepack(q, None)  # opaque: not a buffer
        self._dequantized = q.dequantize  # kept for tests; holds the small int8 tensor only

    def dequantized(self) -> torch.Tensor:
        return self._dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self._packed, True).to(x.dtype)


class PackableWeight:
    """Mixin of the layers that can hold their `weight` packed: call `init_packing` in
    __init__; the loader calls `process_weights_after_loading` once every tensor is in, which
    packs the weight (plus a bf16 copy and tile records where the spec asks) and drops the
    float one; `matmul(x)` is x @ W.T either way."""

    weight: Any  # the float nn.Parameter until packed, then None
    kernel: str | None
    dense_rows: int | None
    tiles: bool
    packed: nn.Module | None
    dense_copy: torch.Tensor | None
    native_call: NativeCall | None

    def init_packing(self, quant: QuantSpec | None, head: bool = False) -> None:
        self.kernel = None if quant is None else quant.head_kernel if head else quant.kernel
        self.dense_rows = None if quant is None else quant.dense_rows
        self.tiles = quant is not None and quant.tiles
        self.packed = None
        self.dense_copy = None
        self.native_call = None

    def process_weights_after_loading(self) -> None:
        if self.kernel is None or self.weight is None:
            return
        self.packed = pack(self.weight.data, self.kernel, self.tiles)
        # Our compiled kernels are called straight from `matmul`: a decode step runs ~120
        # matmuls, and the packed module's call and its buffer lookups cost more than a small one.
        native = getattr(self.packed, "native", None)
        self.native_call = native() if native is not None else None
        if self.dense_rows is not None:
            self.dense_copy = self.weight.data.to(torch.bfloat16)
        self.weight = None  # a tied embedding keeps its own reference to the float tensor

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_copy is not None and self.dense_rows is not None and x.shape[0] >= self.dense_rows:
            return F.linear(x.to(torch.bfloat16), self.dense_copy).to(x.dtype)
        if self.native_call is not None and x.dim() == 2:
            op, weights = self.native_call
            return op(x, *weights)
        if self.packed is not None:
            return self.packed(x)
        assert self.weight is not None
        return dense(x, self.weight)


def pack(weight: torch.Tensor, kernel: str, tiles: bool = False) -> nn.Module:
    """`weight` [out, in] packed for `kernel`; int4 falls back to int8 for a shape it cannot
    tile (e.g. a tensor-parallel shard whose input columns are not a multiple of 32). `tiles`:
    our kernels' weights also get AMX tile records, where this CPU can use them."""
    if kernel == "int4pack":
        # The kernel packs 16 output rows at a time and groups 32 input columns.
        if weight.shape[1] % INT4_GROUP == 0 and weight.shape[0] % 16 == 0:
            return Int4Pack(weight)
        log.debug("int4: a %s weight does not tile (16 x %d); int8 for this layer", tuple(weight.shape), INT4_GROUP)
        return Int8Pack(weight)
    if kernel == "q4native":
        if weight.shape[1] % INT4_GROUP == 0:
            return Q4Native(weight, tiles)
        log.debug("int4: a %s weight does not group by %d; int8 for this layer", tuple(weight.shape), INT4_GROUP)
        return Q8Native(weight, tiles)
    if kernel == "q8native":
        return Q8Native(weight, tiles)
    if kernel == "int8pack":
        return Int8Pack(weight)
    if kernel == "fbgemm":
        return FbgemmInt8(weight)
    raise ValueError(f"no packing for kernel {kernel!r}")

"""Weight formats for our own compiled integer kernels (csrc/quant_ops.cpp), and the per-row
int8 rounding every int8 format shares. layers/quant.py chooses and packs them; activations
are rounded to int8 per block of 32 and multiplied in integers, as llama.cpp does."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels

INT4_GROUP = 32  # input columns per 4-bit block (llama.cpp's Q4_1), and per activation scale


def row_scales(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 scale of each output row of a float32 weight."""
    return (w.abs().amax(dim=1) / 127).clamp(min=1e-12)


def row_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, float32 scale per output row) of a weight, w ~ codes * scale."""
    w = weight.detach().float()
    scale = row_scales(w)
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def int4_blocks(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, ...]:
    """A weight [out, in] as float32 blocks [out, in / group, group], with each block's min and max."""
    out_f, in_f = weight.shape
    if in_f % group:
        raise ValueError(f"int4 needs the input width ({in_f}) to be a multiple of {group}")
    w = weight.detach().float().reshape(out_f, in_f // group, group)
    return w, w.amin(dim=-1), w.amax(dim=-1)


# One of our compiled ops and the weight tensors it takes after the activations.
NativeCall = tuple[Any, tuple[torch.Tensor, ...]]


def amx_tiles() -> bool:
    """Whether weights should carry AMX tile records (csrc/quant_amx.cpp): the library is
    loaded and the CPU and OS let it use AMX-INT8 and AMX-BF16 (RINGLLM_AMX=off says no)."""
    return kernels.loaded() and bool(torch.ops.ringllm.amx_ready())


def tile_records(codes: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor | None:
    """Unsigned byte codes [N, K] as AMX B tiles: for each 16 rows and block of 32 columns, 8
    tile rows of 64 bytes, tile row d holding columns 4d .. 4d + 3 of each row in turn. Given
    q4 block scales [N, K/32], the 4-bit codes of rows 4..7 go in the high nibbles of rows
    0..3, then the 16 rows' scales follow as float32. [N/16, K/32, record bytes], or None for
    a shape that does not tile."""
    n, k = codes.shape
    if n % 16 or k % INT4_GROUP:
        return None
    blocks = k // INT4_GROUP
    tiles = codes.reshape(n // 16, 16, blocks, 8, 4).permute(0, 2, 3, 1, 4).reshape(n // 16, blocks, 512)
    if scales is not None:  # 4-bit codes: tile rows 4..7 go in the high nibbles of rows 0..3
        rows = scales.float().reshape(n // 16, 16, blocks).transpose(1, 2).contiguous()
        tiles = torch.cat([tiles[..., :256] | (tiles[..., 256:] << 4), rows.view(torch.uint8)], dim=2)
    return tiles.contiguous()


def _native_or_dequantized(p: Q4Native | Q8Native, x: torch.Tensor) -> torch.Tensor:
    call = p.native() if x.device.type == "cpu" else None
    if call is None:  # without the library (or off the CPU): correct, slow
        return F.linear(x, p.dequantized().to(x.dtype))
    op, weights = call
    return op(x.reshape(-1, x.shape[-1]), *weights).reshape(*x.shape[:-1], p.shape[0])


class Q4Native(nn.Module):
    """4-bit weights in llama.cpp's Q4_1 blocks (32 codes, a float16 scale and min) for our
    kernel, `torch.ops.ringllm.q4_linear` (layout in csrc/quant_ops.cpp): activations are
    rounded to int8 per block of 32 and multiplied in integers, as llama.cpp does. `tiles`:
    also keep the codes as AMX tile records, where the CPU can use them, for batches."""

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    tiles: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, tiles: bool = True):
        super().__init__()
        out_f, in_f = weight.shape
        w, lo, hi = int4_blocks(weight)
        # Codes against the float16 scale and min the kernel will use; a constant block has scale 0.
        mins, scales = lo.half(), ((hi - lo) / 15).half()
        step = scales.float().clamp(min=torch.finfo(torch.float16).tiny)
        codes = ((w - mins.float()[..., None]) / step[..., None]).round().clamp(0, 15).to(torch.uint8)
        packed = codes[..., :16] | (codes[..., 16:] << 4)  # byte j: code j low, code j + 16 high
        self.register_buffer("codes", packed.reshape(out_f, in_f // 2).contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("mins", mins.t().contiguous())  # [blocks, out]: the kernel sums 16 rows at once
        self.shape = (out_f, in_f)
        # Batches on AMX multiply a second copy of the codes, laid out as tiles (+0.6 byte a weight).
        records = tile_records(codes.reshape(out_f, in_f), self.scales) if tiles and amx_tiles() else None
        self.register_buffer("tiles", records, persistent=False)  # counted as memory, never saved

    def dequantized(self) -> torch.Tensor:
        c = self.codes.reshape(self.shape[0], -1, 16)
        codes = torch.cat([c & 15, c >> 4], dim=-1).float()  # [out, blocks, 32]
        return (codes * self.scales.float()[..., None] + self.mins.t().float()[..., None]).reshape(self.shape)

    def native(self) -> NativeCall | None:
        if not kernels.loaded():
            return None
        tiles = () if self.tiles is None else (self.tiles,)
        return torch.ops.ringllm.q4_linear.default, (self.codes, self.scales, self.mins, *tiles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _native_or_dequantized(self, x)


class Q8Native(nn.Module):
    """Symmetric per-row int8 weights for our kernel, `torch.ops.ringllm.q8_linear`, stored
    as code + 128 (VNNI multiplies unsigned by signed bytes; the activations keep the sign).
    `tiles` as for Q4Native."""

    codes: torch.Tensor
    scale: torch.Tensor
    tiles: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, tiles: bool = True):
        super().__init__()
        codes, scale = row_int8(weight)
        self.register_buffer("codes", (codes.to(torch.int16) + 128).to(torch.uint8))
        self.register_buffer("scale", scale.contiguous())
        self.shape = tuple(weight.shape)
        records = tile_records(self.codes) if tiles and amx_tiles() else None  # batches on AMX: as many bytes again
        self.register_buffer("tiles", records, persistent=False)

    def dequantized(self) -> torch.Tensor:
        return (self.codes.float() - 128) * self.scale[:, None]

    def native(self) -> NativeCall | None:
        if not kernels.loaded():
            return None
        tiles = () if self.tiles is None else (self.tiles,)
        return torch.ops.ringllm.q8_linear.default, (self.codes, self.scale, *tiles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _native_or_dequantized(self, x)

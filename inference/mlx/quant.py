"""`--quant int8|int4` for the MLX backend: MLX's quantized layers, filled with our own codes.

The layers are MLX's (`nn.QuantizedLinear` / `nn.QuantizedEmbedding`: packed codes plus a
scale and a bias per group, w = scale * q + bias), but the codes come from each group's own
minimum and maximum (scale = (max - min) / levels, bias = min), as our torch int4 does,
rather than from `mx.quantize`, which shifts its grid so that zero is exact. On a GGUF Q4_1
source, whose 32-wide blocks are exactly such grids, min/max gives the file's codes back,
while mx.quantize re-rounds every weight: the default model's perplexity rose 19% that way
(bench/mlx_backend.py) and stays within 0.1% this way."""

from __future__ import annotations

from typing import cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

# --quant -> (bits, group size): int4 in Q4_1's groups of 32, int8 in mlx-lm's default 64.
# The embedding and LM head stay int8 under int4, as llama.cpp (Q8_0) and our torch int4 keep
# the head: a 4-bit head alone raised the default model's perplexity by half.
QUANT_BITS = {"int8": (8, 64), "int4": (4, 32)}
_ENDS = ("embed_tokens", "lm_head")


def quantizable(group: int, names: set[str] | None, head: tuple[int, int] | None = None):
    """nn.quantize's predicate: which modules to quantize, and with what. `names`: only those
    a quantized checkpoint holds scales for; `head`: (bits, group) for the embedding and LM head."""

    def pred(path: str, m: nn.Module) -> bool | dict:
        if not hasattr(m, "to_quantized"):
            return False
        ends = path.endswith(_ENDS)
        g = head[1] if head and ends else group
        if m.weight.shape[-1] % g:
            return False  # a width the group size does not divide stays float
        if names is not None:
            return f"{path}.scales" in names
        return {"bits": head[0], "group_size": g} if head and ends else True

    return pred


def minmax_quantize(w: mx.array, group: int, bits: int) -> tuple[mx.array, mx.array, mx.array]:
    """(packed uint32 codes, scales, biases) in MLX's affine layout, codes from each group's
    min and max; `bits` must divide 32 (MLX packs 32 / bits codes per uint32, lowest first)."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group).astype(mx.float32)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    levels = 2**bits - 1
    scale = mx.maximum((hi - lo) / levels, 1e-12)
    q = mx.clip(mx.round((g - lo) / scale), 0, levels).astype(mx.uint32)
    per = 32 // bits
    q = q.reshape(rows, cols // per, per) << (mx.arange(per, dtype=mx.uint32) * bits)
    return q.sum(-1).astype(mx.uint32), scale[..., 0].astype(w.dtype), lo[..., 0].astype(w.dtype)


def quantize_model(model: nn.Module, kind: str) -> None:
    """Swap in MLX's quantized layers for `kind` ("int8" or "int4") and fill them with min/max codes."""
    bits, group = QUANT_BITS[kind]
    floats = dict(cast(list[tuple[str, mx.array]], tree_flatten(model.parameters())))
    nn.quantize(model, group, bits, class_predicate=quantizable(group, None, QUANT_BITS["int8"]))
    for path, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            m.weight, m.scales, m.biases = minmax_quantize(floats[f"{path}.weight"], m.group_size, m.bits)

"""torch ⇄ MLX arrays at the backend's edge (hidden states, positions, slots, logits).

Both sides go through numpy, which has no bfloat16: those move as same-width int16 bit
patterns and are viewed back, so no value is rounded on the way."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import torch

MX_DTYPES: dict[str, mx.Dtype] = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def to_mx(t: torch.Tensor, dtype: mx.Dtype | None = None) -> mx.array:
    """A CPU copy of `t` as an MLX array (cast to `dtype` if given)."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        a = mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
    else:
        a = mx.array(t.numpy())
    return a if dtype is None or a.dtype == dtype else a.astype(dtype)


def index_to_mx(t: torch.Tensor) -> mx.array:
    """Positions, slots and block tables: int32 is what MLX gathers and scatters with."""
    return mx.array(t.detach().to("cpu").numpy().astype(np.int32, copy=False))


def to_torch(a: mx.array) -> torch.Tensor:
    """An evaluated MLX array as a torch CPU tensor of the same dtype."""
    if a.dtype == mx.bfloat16:
        return torch.from_numpy(np.array(a.view(mx.int16))).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))

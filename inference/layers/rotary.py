"""Rotary position embeddings, with the Llama-3 and linear frequency scalings."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModel


def _inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise UnsupportedModel(f"rope scaling type {kind!r} is not supported (supported: linear, llama3)")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE in the rotate-half layout of HF checkpoints."""

    table: torch.Tensor  # [max_position, 2, head_dim]: cos, then sin with its first half negated

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict[str, Any] | None):
        super().__init__()
        inv_freq = _inv_freq(head_dim, theta, scaling)
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        # rotate_half(x) * sin == roll(x, D/2) * (sin with its first half negated): the sign
        # lives in the table, so applying RoPE is 4 ops, not 6 (the same products exactly).
        sin = emb.sin()
        sin[:, : head_dim // 2].neg_()
        # A buffer, not a parameter: rebuilt from the config, never loaded from disk. One
        # table so a step gathers cos and sin in a single op.
        self.register_buffer("table", torch.stack((emb.cos(), sin), dim=1), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per-token tables [T, 2, D]: cos, then the sign-folded sine (for `kernels.rope_kv`
        only), computed once per step and shared by every layer."""
        return self.table.index_select(0, positions).to(dtype)


def apply_rotary(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x: [T, heads, D] (queries and keys may be rotated together in one call)."""
    cos, sin = cos_sin
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class MRotaryEmbedding(RotaryEmbedding):
    """Qwen2-VL's multimodal RoPE: the frequency pairs are split in `sections` (temporal,
    height, width), each rotated by its own row of [3, T] positions. Text tokens carry three
    equal rows, which is plain RoPE, so 1-D positions take the parent's path unchanged."""

    axis: torch.Tensor  # [head_dim]: the position row (0, 1, 2) each table column reads

    def __init__(self, head_dim: int, max_position: int, theta: float, sections: tuple[int, ...]):
        super().__init__(head_dim, max_position, theta, None)
        if 2 * sum(sections) != head_dim:
            raise UnsupportedModel(f"mrope_section {sections} does not cover half of head_dim {head_dim}")
        axis = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sections)])
        # Which position row each of the D table columns reads (both halves of rotate-half).
        self.register_buffer("axis", torch.cat((axis, axis)), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if positions.dim() == 1:
            return super().cos_sin(positions, dtype)
        k, t = positions.shape
        rows = self.table.index_select(0, positions.reshape(-1)).view(k, t, 2, -1)
        # Column d of every token comes from the row of its axis: one gather over the axes.
        return rows.gather(0, self.axis.view(1, 1, 1, -1).expand(1, t, 2, -1))[0].to(dtype)

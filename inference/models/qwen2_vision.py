"""Qwen2-VL's vision tower: patch embedding, ViT blocks with 2-D rotary attention, and the
patch merger that turns each 2x2 block of patches into one decoder-width image token.
Qwen2.5-VL's differs in its parts (RMSNorm, a gated MLP) and attends within windows of
patches in all but a few blocks (`window_order`).

Built from the shared TP-aware layers (vLLM's shapes), so its weights load through the
same weight loaders as the decoder's. It lives only where the embedding lives (the master
of a pipeline): stages downstream receive its output already merged into hidden states."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModel
from ..layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from ..layers.norm import RMSNorm
from ..layers.rotary import apply_rotary
from ..vision_config import VisionConfig


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": _quick_gelu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


class _ConvWeight(nn.Module):
    """Holds the checkpoint's `patch_embed.proj.weight` [E, C, T, P, P] under its own name."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape))


class PatchEmbed(nn.Module):
    """A Conv3d whose stride equals its kernel is one matmul per flattened patch; the weight
    keeps the checkpoint's conv shape so it loads by name."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        p, t = cfg.patch_size, cfg.temporal_patch_size
        self.proj = _ConvWeight((cfg.embed_dim, cfg.in_channels, t, p, p))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(patches.to(w.dtype), w.view(w.shape[0], -1))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        head_dim = cfg.embed_dim // cfg.num_heads
        self.qkv = QKVParallelLinear(cfg.embed_dim, head_dim, cfg.num_heads, cfg.num_heads, bias=True)
        self.proj = RowParallelLinear(cfg.embed_dim, cfg.embed_dim, bias=True)
        self.num_heads, self.head_dim = self.qkv.num_heads, head_dim

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], seqlens: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        # The reference rotates in float32 whatever the weights' dtype.
        q = apply_rotary(q.float(), rope).to(v.dtype)
        k = apply_rotary(k.float(), rope).to(v.dtype)
        out = torch.empty_like(q)
        start = 0
        for length in seqlens:  # each image (frame) attends only to itself, in full
            sl = slice(start, start + length)
            o = F.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1))
            out[sl] = o.transpose(0, 1)
            start += length
        return self.proj(out.flatten(1))


class VisionMlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = ColumnParallelLinear(cfg.embed_dim, hidden, bias=True)
        self.fc2 = RowParallelLinear(hidden, cfg.embed_dim, bias=True)
        if cfg.hidden_act not in _ACTIVATIONS:
            raise UnsupportedModel(f"vision activation {cfg.hidden_act!r} is not supported")
        self.act: Callable[[torch.Tensor], torch.Tensor] = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedVisionMlp(nn.Module):
    """Qwen2.5-VL's: act(gate) * up, then down, all three with biases (checkpoint names kept)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(cfg.embed_dim, cfg.intermediate_size, bias=True)
        self.up_proj = ColumnParallelLinear(cfg.embed_dim, cfg.intermediate_size, bias=True)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.embed_dim, bias=True)
        if cfg.hidden_act not in _ACTIVATIONS:
            raise UnsupportedModel(f"vision activation {cfg.hidden_act!r} is not supported")
        self.act: Callable[[torch.Tensor], torch.Tensor] = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _norm(cfg: VisionConfig) -> nn.Module:
    return RMSNorm(cfg.embed_dim, 1e-6) if cfg.windowed else nn.LayerNorm(cfg.embed_dim, eps=1e-6)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = _norm(cfg)
        self.norm2 = _norm(cfg)
        self.attn = VisionAttention(cfg)
        self.mlp: nn.Module = GatedVisionMlp(cfg) if cfg.windowed else VisionMlp(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], seqlens: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm, then each merge block's m*m patches side by side through a 2-layer MLP.
    `mlp` is indexed 0 and 2 like the checkpoint's nn.Sequential (1 is the activation)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.width = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = _norm(cfg)
        self.mlp = nn.ModuleList(
            [
                ColumnParallelLinear(self.width, self.width, bias=True),
                nn.GELU(),
                RowParallelLinear(self.width, cfg.out_size, bias=True),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_q(x).view(-1, self.width)
        return self.mlp[2](self.mlp[1](self.mlp[0](h)))


def vision_positions(grid_thw: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(row, column) of every patch [N, 2], in the processor's order: merge blocks of m x m
    patches, row-major inside each block and across blocks, repeated per frame."""
    out = []
    for t, h, w in grid_thw:
        hpos = torch.arange(h).view(h, 1).expand(h, w)
        wpos = torch.arange(w).view(1, w).expand(h, w)
        blocks = (h // merge, merge, w // merge, merge)
        hw = [p.reshape(blocks).transpose(1, 2).flatten() for p in (hpos, wpos)]
        out.append(torch.stack(hw, dim=-1).repeat(t, 1))
    return torch.cat(out)


def window_order(grid_thw: list[tuple[int, int, int]], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL's windows: the merge units (m x m patches) of each frame regrouped window by
    window (windows of `window` units a side, row-major; the last row and column of windows
    may be smaller). Returns the units' new order and the windows' lengths in patches."""
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw:
        lh, lw = h // merge, w // merge
        index = torch.arange(t * lh * lw).view(t, lh, lw)
        for f in range(t):
            for r in range(0, lh, window):
                for c in range(0, lw, window):
                    cell = index[f, r : r + window, c : c + window].reshape(-1)
                    order.append(cell + offset)
                    lengths.append(cell.numel() * merge * merge)
        offset += t * lh * lw
    return torch.cat(order), lengths


class VisionTransformer(nn.Module):
    """pixel patches [N, C*T*P*P] of images with grids `grid_thw` -> image tokens
    [N / merge**2, decoder hidden], in the order the prompt's image pads expect them."""

    inv_freq: torch.Tensor

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        # 2-D rotary: a quarter of each head's frequencies for rows, a quarter for columns.
        half = (cfg.embed_dim // cfg.num_heads) // 2
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope(self, grid_thw: list[tuple[int, int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        pos = vision_positions(grid_thw, self.cfg.spatial_merge_size).to(device)
        freqs = (pos[..., None].float() * self.inv_freq).flatten(1)  # [N, head_dim / 2]: rows, then columns
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin()
        sin[:, : sin.shape[1] // 2].neg_()  # sign-folded for apply_rotary (see layers/rotary.py)
        return emb.cos()[:, None], sin[:, None]

    def forward(self, patches: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        x = self.patch_embed(patches)
        rope = self.rope(grid_thw, x.device)
        seqlens = [h * w for t, h, w in grid_thw for _ in range(t)]
        if sum(seqlens) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} patches for grids {grid_thw}")
        cfg = self.cfg
        if not cfg.windowed:
            for block in self.blocks:
                x = block(x, rope, seqlens)
            return self.merger(x)
        # Qwen2.5-VL: regroup the merge units window by window (rotary tables too), attend
        # within windows except in the full-attention blocks (each frame stays contiguous, so
        # `seqlens` still holds there), merge, then put the image tokens back in order.
        unit = cfg.spatial_merge_size**2
        side = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size  # in merge units
        order, windows = window_order(grid_thw, cfg.spatial_merge_size, side)
        order = order.to(x.device)

        def regroup(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(-1, unit, *t.shape[1:]).index_select(0, order).reshape(t.shape)

        x = regroup(x)
        rope = (regroup(rope[0]), regroup(rope[1]))
        for i, block in enumerate(self.blocks):
            x = block(x, rope, seqlens if i in cfg.full_attention_blocks else windows)
        return self.merger(x)[torch.argsort(order)]

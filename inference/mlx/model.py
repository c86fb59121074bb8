"""Llama and Qwen2 in MLX, built for one pipeline stage's layer range (the MLX twin of
inference/models/llama.py; Qwen2 is the same graph with q/k/v biases).

Parameter names follow the HF checkpoint except for two merged projections, declared once
in `MERGED` (q/k/v -> qkv_proj, gate/up -> gate_up_proj): one matmul instead of three (two)
per layer, which matters for small decode steps. `layers[i]` is global layer `start + i`;
the embedding exists only on a stage that embeds, the final norm and head only on one that
holds the head."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import LayerRange, ModelConfig
from ..layers.rotary import _inv_freq
from .attention import PagedKVCache, StepLayout, paged_attention

# our merged parameter -> the checkpoint projections it concatenates (rows, in this order)
MERGED: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


class Rotary:
    """cos/sin tables [max_position, D] in the rotate-half layout of HF checkpoints, with the
    same frequencies (and Llama-3 / linear scaling) as the torch model."""

    def __init__(self, cfg: ModelConfig):
        inv = mx.array(_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).numpy())
        freqs = mx.arange(cfg.max_position, dtype=mx.float32)[:, None] * inv[None]
        emb = mx.concatenate([freqs, freqs], axis=-1)
        self.cos, self.sin = mx.cos(emb), mx.sin(emb)
        mx.eval(self.cos, self.sin)  # now, on the loading thread (MLX runs lazy arrays on their own)

    def tables(self, positions: mx.array, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """Per-token [T, 1, D] tables, gathered once per step and shared by every layer."""
        return self.cos[positions][:, None].astype(dtype), self.sin[positions][:, None].astype(dtype)


def apply_rotary(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.h, self.kv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.layer = layer  # index into the stage's own cache
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.h + 2 * self.kv) * self.d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size, bias=False)

    def __call__(self, x: mx.array, rope: tuple[mx.array, mx.array], step: StepLayout, cache: PagedKVCache):
        t, h, kv = x.shape[0], self.h, self.kv
        qkv = self.qkv_proj(x).reshape(t, h + 2 * kv, self.d)
        qk = apply_rotary(qkv[:, : h + kv], *rope)  # queries and keys rotated together
        o = paged_attention(qk[:, :h], qk[:, h:], qkv[:, h + kv :], self.layer, cache, step, self.scale)
        return self.o_proj(o.reshape(t, h * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gu = self.gate_up_proj(x)
        return self.down_proj(nn.silu(gu[:, : self.inter]) * gu[:, self.inter :])


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def __call__(self, h: mx.array, rope, step: StepLayout, cache: PagedKVCache) -> mx.array:
        h = h + self.self_attn(self.input_layernorm(h), rope, step, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Body(nn.Module):
    """`model.*` of the checkpoint: what this stage holds of the embedding, layers and norm."""

    def __init__(self, cfg: ModelConfig, rng: LayerRange):
        super().__init__()
        if rng.embed:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i) for i in range(len(rng))]
        if rng.head:
            self.norm = nn.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class StageModel(nn.Module):
    """One stage of a Llama/Qwen2 model. `__call__` takes token ids where the stage embeds
    and hidden states elsewhere and returns the hidden states after its layers;
    `compute_logits` (final norm + LM head) only where the stage holds the head."""

    def __init__(self, cfg: ModelConfig, rng: LayerRange):
        super().__init__()
        self.config, self.rng = cfg, rng
        self.tied = cfg.tie_word_embeddings and bool(rng.embed)  # the head reuses the embedding
        self.model = Body(cfg, rng)
        if rng.head and not self.tied:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rotary = Rotary(cfg)  # underscore: a table, not a parameter (never loaded or quantized)

    def __call__(self, x: mx.array, positions: mx.array, step: StepLayout, cache: PagedKVCache) -> mx.array:
        h = self.model.embed_tokens(x) if self.rng.embed else x
        if self.model.layers:
            rope = self._rotary.tables(positions, h.dtype)
            for layer in self.model.layers:
                h = layer(h, rope, step, cache)
        return h

    def compute_logits(self, hidden: mx.array) -> mx.array:
        if not self.rng.head:
            raise RuntimeError("this stage does not hold the LM head")
        h = self.model.norm(hidden)
        return self.model.embed_tokens.as_linear(h) if self.tied else self.lm_head(h)


def qwen2_config(cfg: ModelConfig) -> ModelConfig:
    """Qwen2 checkpoints always carry q/k/v biases; their config has no flag for it."""
    import dataclasses

    return dataclasses.replace(cfg, qkv_bias=True) if cfg.architecture == "Qwen2ForCausalLM" else cfg

"""LLaMA family (Llama 2/3, SmolLM, ...), built for one pipeline stage's layer range."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .. import kernels
from ..config import LayerRange, ModelConfig
from ..layers.activation import SiluAndMul
from ..layers.attention import Attention, AttentionMetadata
from ..layers.embedding import ParallelLMHead, VocabParallelEmbedding
from ..layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from ..layers.norm import RMSNorm
from ..layers.quant import QuantSpec
from ..layers.rotary import MRotaryEmbedding, RotaryEmbedding

KVCache = tuple[torch.Tensor, torch.Tensor]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, attn_backend: str, quant: QuantSpec | None):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, bias=cfg.qkv_bias, quant=quant
        )
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False, quant=quant)
        # This rank's heads (all of them without tensor parallelism), as the projection split them.
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.attn = Attention(self.num_heads, self.num_kv_heads, cfg.head_dim, layer_idx, attn_backend)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, meta: AttentionMetadata, cache: KVCache) -> torch.Tensor:
        qkv = self.qkv_proj(x).view(x.shape[0], -1, self.head_dim)
        # Queries and keys are adjacent heads of the merged output: rotated in one go, and the
        # keys and values written to the cache in the same pass.
        q, k, v = kernels.rope_kv(qkv, rope, self.num_heads, self.num_kv_heads, cache, meta.slot_mapping)
        o = self.attn(q, k, v, meta, cache)
        return self.o_proj(o.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: QuantSpec | None):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, bias=False, quant=quant
        )
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=False, quant=quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, attn_backend: str, quant: QuantSpec | None):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx, attn_backend, quant)
        self.mlp = LlamaMLP(cfg, quant)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # decode_layer's weights; False: it cannot run this layer; None: not looked at yet.
        self._fused: tuple | Literal[False] | None = None

    def forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        rope: torch.Tensor,
        meta: AttentionMetadata,
        cache: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it); the stream after the layer
        is their sum, which the next layer's norm adds (fused) or the model's end."""
        if (fused := self._fused_weights(h, residual, meta)) is not None:
            attn = self.self_attn
            out, stream = torch.ops.ringllm.decode_layer.default(
                h, residual, *fused, rope, *cache, meta.slot_mapping, meta.block_tables, meta.ctx_lens,
                attn.attn.scale, attn.num_heads, attn.num_kv_heads,
            )  # fmt: skip
            return out, stream
        if residual is None:
            x, residual = self.input_layernorm(h), h
        else:
            x, residual = self.input_layernorm(h, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(x, rope, meta, cache), residual)
        return self.mlp(x), residual

    def _fused_weights(self, h: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata) -> tuple | None:
        """The layer's weights for `torch.ops.ringllm.decode_layer` (csrc/decode_layer.cpp: this
        forward in one call, the same kernels in the same order) when this step can use it: a
        pure decode on CPU with the compiled kernels on, every matmul on our quantized kernels
        or on float weights (not torch's pack kernels, not split for tensor parallelism), and
        fewer rows than a bf16 copy would take. None otherwise."""
        if self._fused is None:
            self._fused = self._collect_fused()
        fused = self._fused
        if fused is False or not kernels.available() or meta.num_decodes != len(meta.q_lens):
            return None
        dense_rows = self.mlp.down_proj.dense_rows
        if (dense_rows is not None and h.shape[0] >= dense_rows) or not meta.block_tables.is_contiguous():
            return None
        if h.device.type != "cpu" or not h.is_contiguous() or (residual is not None and not residual.is_contiguous()):
            return None
        return fused

    def _collect_fused(self) -> tuple | Literal[False]:
        attn, mlp = self.self_attn, self.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if any(m.tp_size != 1 for m in linears) or any(m.bias is not None for m in linears[1:]):
            return False
        calls = [m.native_call for m in linears]
        if all(c is not None for c in calls):
            qkv, o, gate_up, down = (list(c[1]) for c in calls if c is not None)
        elif all(m.packed is None and m.weight is not None for m in linears):  # float weights
            qkv, o, gate_up, down = ([m.weight] for m in linears)
        else:  # torch's pack kernels
            return False
        norms = (self.input_layernorm.weight, self.post_attention_layernorm.weight, self.input_layernorm.eps)
        return (*norms, qkv, attn.qkv_proj.bias, o, gate_up, down)


class LlamaModel(nn.Module):
    """Holds only what the stage runs: the embedding and/or the final norm (applied by
    `LlamaForCausalLM.compute_logits`, so that a pipeline master holding both ends can
    embed, send hidden states out, and finish them when they return).
    `layers[i]` is global layer `start + i`."""

    def __init__(self, cfg: ModelConfig, rng: LayerRange, attn_backend: str, quant: QuantSpec | None):
        super().__init__()
        self.rng = rng
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size) if rng.embed else None
        self.rotary = (
            MRotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_theta, cfg.mrope_section)
            if cfg.mrope_section
            else RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_theta, cfg.rope_scaling)
        )
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, attn_backend, quant) for i in range(len(rng)))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if rng.head else None

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, caches: list[KVCache]
    ) -> torch.Tensor:
        # Float input is hidden states: a later stage's, or embeddings merged with images.
        h = self.embed_tokens(x) if self.embed_tokens is not None and not x.is_floating_point() else x
        if self.layers:
            rope = self.rotary.cos_sin(positions, h.dtype)
            residual: torch.Tensor | None = None
            for layer, cache in zip(self.layers, caches):
                h, residual = layer(h, residual, rope, meta, cache)
            assert residual is not None
            h = h + residual
        return h


class LlamaForCausalLM(nn.Module):
    """Stage model: `forward` takes token ids where the stage embeds and hidden states
    elsewhere, and returns the hidden states after its layers; `compute_logits` (final
    norm + LM head) works only where the stage holds the head."""

    # checkpoint projection name -> (our merged parameter, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(
        self,
        cfg: ModelConfig,
        rng: LayerRange | None = None,
        attn_backend: str = "sdpa",
        quant: QuantSpec | None = None,
    ):
        super().__init__()
        self.config = cfg
        self.rng = rng if rng is not None else LayerRange(0, cfg.num_layers, cfg.num_layers)
        self.model = LlamaModel(cfg, self.rng, attn_backend, quant)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, quant) if self.rng.head else None
        if self.lm_head is not None and cfg.tie_word_embeddings and self.model.embed_tokens is not None:
            # One tensor for both ends; a last-only stage loads the embedding into lm_head.
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, caches: list[KVCache]
    ) -> torch.Tensor:
        return self.model(x, positions, meta, caches)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, H] of the token ids; only where the stage holds the embedding."""
        if self.model.embed_tokens is None:
            raise RuntimeError("this stage does not hold the embedding")
        return self.model.embed_tokens(token_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None or self.model.norm is None:
            raise RuntimeError("this stage does not hold the LM head")
        return self.lm_head(self.model.norm(hidden))

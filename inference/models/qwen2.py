"""Qwen2 family: the LLaMA architecture with a bias on the merged Q/K/V projection."""

from __future__ import annotations

import dataclasses

from ..config import LayerRange, ModelConfig
from ..layers.quant import QuantSpec
from .llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(
        self,
        cfg: ModelConfig,
        rng: LayerRange | None = None,
        attn_backend: str = "sdpa",
        quant: QuantSpec | None = None,
    ):
        # Qwen2 checkpoints always carry q/k/v biases; their config has no flag for it.
        super().__init__(dataclasses.replace(cfg, qkv_bias=True), rng, attn_backend, quant)

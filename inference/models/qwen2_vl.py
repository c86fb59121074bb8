"""Qwen2-VL: the Qwen2 decoder with multimodal rotary positions (M-RoPE, three rows of
position ids: temporal, height, width) and a vision tower whose image tokens replace the
prompt's image pads in the embedded prompt.

The decoder is Qwen2's (the rotary layer follows `ModelConfig.mrope_section`); the vision
tower exists only on the stage holding the embedding, where images are merged in, so later
pipeline stages see ordinary hidden states plus [3, T] positions."""

from __future__ import annotations

import torch

from ..config import LayerRange, ModelConfig
from ..errors import UnsupportedModel
from ..layers.quant import QuantSpec
from .qwen2 import Qwen2ForCausalLM
from .qwen2_vision import VisionTransformer


class Qwen2VLForConditionalGeneration(Qwen2ForCausalLM):
    def __init__(
        self,
        cfg: ModelConfig,
        rng: LayerRange | None = None,
        attn_backend: str = "sdpa",
        quant: QuantSpec | None = None,
    ):
        if cfg.vision is None or cfg.mrope_section is None:
            raise UnsupportedModel("a Qwen2-VL checkpoint needs vision_config and an mrope_section")
        super().__init__(cfg, rng, attn_backend, quant)
        # Never quantized: the tower runs once per image, and its small matrices gain little.
        self.visual = VisionTransformer(cfg.vision) if self.rng.embed else None

    def embed_images(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """Image tokens [sum of tokens per image, H] of the processed images, in prompt order."""
        if self.visual is None:
            raise RuntimeError("this stage does not hold the vision tower")
        return self.visual(pixel_values, grids)

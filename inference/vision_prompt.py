"""Chat messages with pictures -> the prompt a Qwen2-VL model reads: the images resized and
cut into patches by transformers' image processor (bounded by --min-pixels/--max-pixels),
the template's one image pad per picture expanded to that picture's token count, and the
M-RoPE positions of the whole prompt (inference/multimodal.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .detokenizer import apply_chat_template
from .errors import InvalidParameter
from .multimodal import ImageInputs, expand_image_pads, image_token_counts
from .vision_config import VisionConfig

log = logging.getLogger(__name__)

# The processor's own defaults (Qwen2-VL's preprocessor_config.json uses the same).
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280


class ImagePrompter:
    """Builds image prompts for one vision model. Stateless after construction (the image
    processor holds only settings), so any thread may call it."""

    def __init__(self, path: Path, vision: VisionConfig, min_pixels: int | None = None, max_pixels: int | None = None):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.vision = vision
        # The PIL backend: the default one needs torchvision, which we do not install.
        kwargs: dict[str, Any] = dict(
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size,
        )
        if (path / "preprocessor_config.json").is_file():
            kwargs = {}  # the checkpoint's own settings (mean, std, sizes), then our bounds
        if min_pixels is not None:
            kwargs["min_pixels"] = min_pixels
        if max_pixels is not None:
            kwargs["max_pixels"] = max_pixels
        if kwargs.keys() - {"min_pixels", "max_pixels"}:
            self.processor = Qwen2VLImageProcessorPil(**kwargs)
        else:
            self.processor = Qwen2VLImageProcessorPil.from_pretrained(str(path), **kwargs)
        size = self.processor.size
        log.info("images resized to %s..%s pixels", size.get("shortest_edge"), size.get("longest_edge"))

    def process(self, images: list[Any]) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        """PIL images -> (patches [N, C*T*P*P] float32, (t, h, w) grid per image)."""
        try:
            out = self.processor(images=images, return_tensors="pt")
        except ValueError as e:  # e.g. an aspect ratio over 200:1
            raise InvalidParameter("messages", f"image cannot be processed: {e}") from None
        grids = [(int(t), int(h), int(w)) for t, h, w in out["image_grid_thw"].tolist()]
        return out["pixel_values"].to(torch.float32), grids

    def encode(
        self, tokenizer: Any, messages: list[dict[str, Any]], images: list[Any], tools: list[dict] | None = None
    ) -> tuple[list[int], ImageInputs]:
        """`messages` hold {"type": "image"} parts, one per entry of `images`, in order."""
        ids = apply_chat_template(tokenizer, messages, tools=tools)
        pixels, grids = self.process(images)
        merge = self.vision.spatial_merge_size
        ids = expand_image_pads(ids, self.vision.image_token_id, image_token_counts(grids, merge))
        return ids, ImageInputs.build(ids, self.vision.image_token_id, pixels, grids, merge)

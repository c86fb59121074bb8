"""A vision tower's shape as our model code reads it (HF `vision_config` of Qwen2-VL and
Qwen2.5-VL), with the special tokens that place its output in the prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class VisionConfig:
    """A Qwen2-VL or Qwen2.5-VL vision tower (HF `vision_config`) and the special tokens that
    place its output in the prompt. `out_size` is the decoder's hidden size (what the merger
    emits). Qwen2.5-VL (`windowed`) has RMSNorm, a gated MLP of `intermediate_size`, and
    window attention (windows of `window_size` pixels) except in `full_attention_blocks`."""

    depth: int
    embed_dim: int
    out_size: int
    num_heads: int
    mlp_ratio: float
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int
    hidden_act: str
    rope_theta: float
    image_token_id: int
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    windowed: bool = False
    intermediate_size: int = 0
    window_size: int = 0
    full_attention_blocks: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> VisionConfig:
        v = cfg["vision_config"]
        text = cfg.get("text_config") or cfg
        windowed = "out_hidden_size" in v  # Qwen2.5-VL names the tower's width hidden_size
        return cls(
            depth=v["depth"],
            embed_dim=v["hidden_size"] if windowed else v["embed_dim"],
            out_size=v["out_hidden_size"] if windowed else v.get("hidden_size") or text["hidden_size"],
            num_heads=v["num_heads"],
            mlp_ratio=float(v.get("mlp_ratio", 4)),
            patch_size=v.get("patch_size", 14),
            temporal_patch_size=v.get("temporal_patch_size", 2),
            spatial_merge_size=v.get("spatial_merge_size", 2),
            in_channels=v.get("in_channels", v.get("in_chans", 3)),
            hidden_act=v.get("hidden_act", "silu" if windowed else "quick_gelu"),
            rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            image_token_id=cfg.get("image_token_id", 151655),
            vision_start_token_id=cfg.get("vision_start_token_id"),
            vision_end_token_id=cfg.get("vision_end_token_id"),
            windowed=windowed,
            intermediate_size=v.get("intermediate_size", 0) if windowed else 0,
            window_size=v.get("window_size", 112) if windowed else 0,
            full_attention_blocks=tuple(v.get("fullatt_block_indexes", ())) if windowed else (),
        )

"""Maps a checkpoint's `architectures` entry to our model class."""

from __future__ import annotations

from ..errors import UnsupportedModel
from .llama import LlamaForCausalLM
from .qwen2 import Qwen2ForCausalLM
from .qwen2_vl import Qwen2VLForConditionalGeneration

# Every supported architecture is LLaMA-shaped (Qwen2 subclasses it), so callers get a typed
# model: its config, packed_modules_mapping, embed and compute_logits.
MODELS: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen2VLForConditionalGeneration": Qwen2VLForConditionalGeneration,
    # Qwen2.5-VL: the same decoder; its tower's differences follow VisionConfig.windowed.
    "Qwen2_5_VLForConditionalGeneration": Qwen2VLForConditionalGeneration,
}


def model_class(architecture: str) -> type[LlamaForCausalLM]:
    try:
        return MODELS[architecture]
    except KeyError:
        raise UnsupportedModel(
            f"architecture {architecture!r} is not supported; supported: {', '.join(sorted(MODELS))}"
        ) from None

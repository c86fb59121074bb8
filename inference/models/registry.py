"""Maps a checkpoint's `architectures` entry to our model class."""
from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModel
from .llama import LlamaForCausalLM
from .qwen2 import Qwen2ForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODELS[architecture]
    except KeyError:
        raise UnsupportedModel(
            f"architecture {architecture!r} is not supported; supported: {', '.join(sorted(MODELS))}"
        ) from None

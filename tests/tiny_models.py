"""Tiny random checkpoints of each supported family, saved like a real HF model dir."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)

VARIANTS = {
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-untied": ("llama", dict(tie_word_embeddings=False)),
    "llama3-rope-scaling": (
        "llama",
        dict(
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "qwen2": ("qwen2", dict(tie_word_embeddings=False)),
}


def make_tiny(kind: str, path: Path, seed: int = 0):
    """Save a random HF model of variant `kind` to `path`; returns the HF model (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    family, extra = VARIANTS[kind]
    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    cfg = cfg_cls(**TINY, **extra)
    torch.manual_seed(seed)
    model = model_cls(cfg).float().eval()
    # Random init leaves biases at zero; make them matter for the parity check.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(str(path))
    return model


class IdTokenizer:
    """Enough of a tokenizer for the Engine on a tiny random model: text is the ids."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) -> str:
        return "".join(f" {i}" for i in ids)


def save_word_tokenizer(path: Path, vocab_size: int = 256) -> None:
    """A word-level tokenizer over the tiny model's vocabulary ("t0" .. "t255"), saved the way
    a real checkpoint carries one, so the real master can load the tiny model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk).save_pretrained(str(path))

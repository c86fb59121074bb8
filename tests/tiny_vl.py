"""A tiny random Qwen2-VL checkpoint with a byte-level tokenizer that knows the vision
special tokens and a Qwen2-VL style chat template, saved like a real HF model dir; no
network. Images are small generated pictures of different sizes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
EOS, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD = range(256, 256 + len(SPECIALS))
VOCAB = 300

# Qwen2-VL's template without the default system prompt (shorter prompts, same layout).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS})
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    assert fast.convert_tokens_to_ids("<|image_pad|>") == IMAGE_PAD


def make_tiny_vl(path: Path, seed: int = 0, windowed: bool = False):
    """Save a random Qwen2-VL (2 decoder layers, 2 vision blocks) and its tokenizer to `path`;
    returns the HF model (float32, eval). `windowed`: a Qwen2.5-VL instead, whose first block
    attends within windows of 2 x 2 merge units and whose second attends in full."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    vision: dict = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
    config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    if windowed:
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=48,
            out_hidden_size=64,
            num_heads=2,
            window_size=56,
            fullatt_block_indexes=[1],
        )
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    cfg = config_cls(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            bos_token_id=None,
            eos_token_id=IM_END,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
        ),
        vision_config=dict(vision, patch_size=14, spatial_merge_size=2),
        image_token_id=IMAGE_PAD,
        video_token_id=VOCAB - 1,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    torch.manual_seed(seed)
    model = model_cls(cfg).float().eval()
    with torch.no_grad():  # random init leaves biases at zero and norms at one: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name or "ln_q" in name:
                p.normal_(1, 0.2)
    model.save_pretrained(str(path))
    save_tokenizer(path)
    # Small bounds keep the tower's work tiny: a picture becomes a few dozen patches.
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Qwen2VLImageProcessor",
                "min_pixels": 28 * 28,
                "max_pixels": 28 * 28 * 16,
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
            }
        )
    )
    return model


def picture(width: int, height: int, seed: int = 0):
    """A deterministic RGB picture (random noise: every patch differs)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    picture(width, height, seed).save(buf, format="PNG")
    return buf.getvalue()

"""LoRA with MLX on a tiny model: training lowers the loss, writes the adapter and its loss
curve, and the served adapter changes the greedy output (whole, and split by layer range)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'mlx[cpu]')")

from inference.config import EngineConfig, LayerRange, SamplingParams  # noqa: E402
from inference.mlx.engine import mlx_engine  # noqa: E402
from inference.mlx.lora import main as lora_main  # noqa: E402

from .tiny_models import (
    make_tiny,  # noqa: E402
    save_word_tokenizer,  # noqa: E402
)

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PATTERN = " ".join(f"t{i}" for i in range(10, 42))  # a counting sequence the random model does not know


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model = root / "model"
    make_tiny("llama-tied", model)
    save_word_tokenizer(model)
    # A random init's embedding (std 0.02) caps a tied head's logits near uniform, whatever the
    # layers do; larger rows let what LoRA changes in the layers show in the loss.
    weights = load_file(str(model / "model.safetensors"))
    weights["model.embed_tokens.weight"] *= 8
    save_file(weights, str(model / "model.safetensors"))
    data = root / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"text": PATTERN}) for _ in range(4)) + "\n")
    argv = ["--model", str(model), "--data", str(data), "--out", str(root / "adapter"), "--rank", "4"]
    assert (
        lora_main(argv + ["--iters", "30", "--lr", "0.01", "--batch", "2", "--targets", "qkv_proj", "down_proj"]) == 0
    )
    return model, root / "adapter"


def test_training_lowers_the_loss_and_writes_the_adapter(trained):
    _, adapter = trained
    losses = json.loads((adapter / "loss.json").read_text())
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0]
    assert (adapter / "loss.png").stat().st_size > 0
    assert json.loads((adapter / "adapter_config.json").read_text())["targets"] == ["qkv_proj", "down_proj"]


def test_served_adapter_changes_the_output(trained):
    model, adapter = trained
    base = mlx_engine(EngineConfig(model=str(model), kv_cache_gb=0.01))
    tuned = mlx_engine(EngineConfig(model=str(model), kv_cache_gb=0.01, backend="mlx", adapter=str(adapter)))
    prompt = base.encode("t10 t11 t12 t13")
    assert tuned.generate([prompt], GREEDY)[0][1] != base.generate([prompt], GREEDY)[0][1]


def test_a_stage_loads_only_its_layers_part(trained):
    from inference.mlx.adapter import LoRALinear
    from inference.mlx.loader import load_stage

    model, adapter = trained
    stage = load_stage(str(model), layers=LayerRange(2, 4, 4, embed=False, head=False), adapter=str(adapter))
    assert all(isinstance(layer.self_attn.qkv_proj, LoRALinear) for layer in stage.model.model.layers)


def test_adapter_needs_the_mlx_backend():
    with pytest.raises(ValueError, match="--backend mlx"):
        EngineConfig(adapter="somewhere")

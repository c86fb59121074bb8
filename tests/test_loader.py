"""Model sources and their errors: unknown architecture, missing model, offline hub."""

from __future__ import annotations

import json

import pytest

from inference.errors import ModelNotFound, UnsupportedModel
from inference.loader import load_model
from inference.model_source import resolve_model
from tests.tiny_models import make_tiny


def test_unknown_architecture_names_the_supported_ones(tmp_path):
    make_tiny("llama-tied", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match="FalconForCausalLM.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        load_model(str(tmp_path))


def test_missing_model_is_one_clear_error(tmp_path):
    with pytest.raises(ModelNotFound, match="not found"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "x.bin").write_bytes(b"junk")
    with pytest.raises(ModelNotFound, match="gguf"):
        resolve_model(str(tmp_path / "x.bin"))
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelNotFound, match="cannot read GGUF"):
        resolve_model(str(tmp_path / "bad.gguf"))


def test_uncached_repo_offline_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFound, match="not in the local cache and HF_HUB_OFFLINE is set"):
        resolve_model("someone/not-cached-model")


def test_sharded_checkpoint_with_index(tmp_path):
    """A model saved in several safetensors shards loads through its index."""
    import torch

    from inference.config import SamplingParams
    from inference.sequence import Sequence
    from tests.test_parity import Chain, reference_logits

    hf = make_tiny("qwen2", tmp_path / "one")
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    prompt = [3, 14, 15, 92, 65]
    ref, _, _ = reference_logits(hf, prompt)
    chain = Chain(tmp_path / "sharded", [(0, hf.config.num_hidden_layers)])
    got = chain.step(Sequence(prompt, SamplingParams()), len(prompt))
    assert torch.allclose(got, ref, atol=1e-4)

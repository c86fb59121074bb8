"""torch.ops.ringllm.decode_layer (csrc/decode_layer.cpp), a decode step's whole layer in one
call: bit-identical logits to the Python layer it replaces, Llama and Qwen2 (QKV bias), 4-bit,
8-bit and float weights, over decodes of three sequences of different lengths; and the steps it
must leave to the Python layer."""

from __future__ import annotations

import pytest
import torch

from inference import kernels
from inference.config import SamplingParams
from inference.kv_cache import KVCacheManager
from inference.layers.quant import QuantSpec
from inference.model_runner import ModelRunner
from inference.scheduler import ScheduledSeq
from inference.sequence import Sequence
from tests.tiny_models import make_tiny

pytestmark = pytest.mark.skipif(not kernels.load(), reason="compiled kernels unavailable (no C++ compiler?)")


def load_native(path, quant: str, monkeypatch, dense_rows: int | None = None, kernel: str | None = None):
    """The tiny model on our quantized kernels whatever this CPU is (their portable loops
    where it has no VNNI), so the fused layer applies; float weights for quant "none"."""
    import inference.loader as loader

    if quant == "none":
        return loader.load_model(str(path))
    spec = QuantSpec(quant, kernel or ("q4native" if quant == "int4" else "q8native"), "q8native", dense_rows)
    monkeypatch.setattr(loader, "choose", lambda kind, device, native=False: spec)
    return loader.load_model(str(path), quant=quant)


def decode_logits(loaded, fused: bool, steps: int = 6) -> list[torch.Tensor]:
    """A prefill step of three prompts, then `steps` pure decode steps; the logits of each."""
    layers = loaded.model.model.layers
    for layer in layers:
        layer._fused = None if fused else False
    kv = KVCacheManager(num_blocks=64, block_size=4)
    runner = ModelRunner(loaded.model, loaded.config, loaded.layers, 64, 4, torch.float32, "cpu")
    seqs = [Sequence(list(range(3 + 5 * i, 14 + 7 * i)), SamplingParams()) for i in range(3)]
    out = []
    for _ in range(steps + 1):
        batch = []
        for s in seqs:
            n = 1 if s.num_computed_tokens else s.num_prompt_tokens
            kv.allocate(s, s.num_computed_tokens + n)
            batch.append(ScheduledSeq(s, n))
        inputs = runner.prepare(batch)
        with torch.inference_mode():
            out.append(loaded.model.compute_logits(runner.forward(inputs)))
        for item in batch:
            item.seq.num_computed_tokens += item.num_new_tokens
            item.seq.output_token_ids.append(int(out[-1][batch.index(item)].argmax()))
    return out


@pytest.mark.parametrize("kind", ["llama-untied", "qwen2"])
@pytest.mark.parametrize("quant", ["int4", "int8", "none"])
def test_the_fused_layer_equals_the_python_layer(tmp_path, monkeypatch, kind, quant):
    make_tiny(kind, tmp_path)
    loaded = load_native(tmp_path, quant, monkeypatch)
    fused = decode_logits(loaded, fused=True)
    assert all(isinstance(layer._fused, tuple) for layer in loaded.model.model.layers)  # it did run
    python = decode_logits(loaded, fused=False)
    for a, b in zip(fused, python):
        assert torch.equal(a, b)


def test_what_stays_with_the_python_layer(tmp_path, monkeypatch):
    make_tiny("llama-untied", tmp_path)
    loaded = load_native(tmp_path, "int4", monkeypatch, dense_rows=3)
    layer = loaded.model.model.layers[0]
    h = torch.zeros(2, 64)
    meta = type("Meta", (), dict(num_decodes=2, q_lens=[1, 1], block_tables=torch.zeros(2, 4, dtype=torch.long)))
    assert layer._fused_weights(h, None, meta) is not None  # 2 decodes, below the bf16 copy's 3 rows
    assert layer._fused_weights(torch.zeros(3, 64), None, meta) is None  # the bf16 copy's batch size
    meta.num_decodes = 1  # a prefill in the step
    assert layer._fused_weights(h, None, meta) is None
    meta.num_decodes = 2
    with kernels.torch_ops_only():
        assert layer._fused_weights(h, None, meta) is None
    torch_packed = load_native(tmp_path, "int4", monkeypatch, kernel="int4pack")  # torch's kernels: not ours
    assert torch_packed.model.model.layers[0]._fused_weights(h, None, meta) is None

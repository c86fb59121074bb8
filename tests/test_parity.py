"""Our models against transformers (the reference) on tiny random checkpoints:
float32 logits within 1e-4 over a prefill and 20 cached decode steps, whole and split."""

from __future__ import annotations

import pytest
import torch

from inference.config import LayerRange, SamplingParams
from inference.kv_cache import KVCacheManager
from inference.loader import load_model
from inference.model_runner import ModelRunner
from inference.scheduler import ScheduledSeq
from inference.sequence import Sequence
from tests.tiny_models import VARIANTS, make_tiny

TOL = 1e-4
DECODE_STEPS = 20


class Chain:
    """Stages run back to back by hand, each with its own KV tensors."""

    def __init__(self, path, ranges):
        self.kv = KVCacheManager(num_blocks=64, block_size=4)
        self.runners = []
        for rng in ranges:
            loaded = load_model(str(path), layers=rng)
            self.runners.append(ModelRunner(loaded.model, loaded.config, loaded.layers, 64, 4, torch.float32, "cpu"))

    def step(self, seq: Sequence, n: int) -> torch.Tensor:
        """Run n new tokens of seq; return the logits of those n positions."""
        self.kv.allocate(seq, seq.num_computed_tokens + n)
        item = ScheduledSeq(seq, n)
        inputs = self.runners[0].prepare([item])
        hidden = None
        for r in self.runners:
            hidden = r.forward(inputs, hidden)
        seq.num_computed_tokens += n
        return next(r for r in self.runners if r.layers.head).model.compute_logits(hidden)


def reference_logits(hf, prompt: list[int]) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    """HF prefill logits, then 20 greedy decode steps with its KV cache."""
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True)
        prefill, past = out.logits[0], out.past_key_values
        tokens, steps = [], []
        nxt = int(prefill[-1].argmax())
        for _ in range(DECODE_STEPS):
            tokens.append(nxt)
            out = hf(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits[0, -1])
            nxt = int(out.logits[0, -1].argmax())
    return prefill, steps, tokens


@pytest.mark.parametrize("kind", list(VARIANTS))
@pytest.mark.parametrize("split", [None, 1, 3, "ends"], ids=["whole", "split1", "split3", "master-ends"])
def test_logits_match_transformers(tmp_path, kind, split):
    hf = make_tiny(kind, tmp_path)
    n = hf.config.num_hidden_layers
    prompt = torch.randint(0, hf.config.vocab_size, (11,), generator=torch.Generator().manual_seed(1)).tolist()
    ref_prefill, ref_steps, tokens = reference_logits(hf, prompt)

    if split == "ends":  # a pipeline master (embedding, norm, head) and one all-layers worker
        ranges = [LayerRange(0, 0, n, embed=True, head=True), LayerRange(0, n, n, embed=False, head=False)]
    else:
        ranges = [(0, n)] if split is None else [(0, split), (split, n)]
    chain = Chain(tmp_path, ranges)
    seq = Sequence(prompt, SamplingParams(temperature=0))
    # Prefill in two chunks, so cached-context attention is exercised too.
    ours = torch.cat([chain.step(seq, 7), chain.step(seq, 4)])
    assert (ours - ref_prefill).abs().max().item() < TOL
    for tok, ref in zip(tokens, ref_steps):
        seq.append_token(tok)
        got = chain.step(seq, 1)[-1]
        assert (got - ref).abs().max().item() < TOL


def test_half_range_holds_only_its_layers(tmp_path):
    make_tiny("llama-untied", tmp_path)
    first = load_model(str(tmp_path), layers=(0, 2)).model
    names = set(dict(first.named_parameters()))
    assert "model.embed_tokens.weight" in names
    assert not any(n.startswith(("lm_head", "model.norm")) for n in names)
    assert len(first.model.layers) == 2
    last = load_model(str(tmp_path), layers=(2, 4)).model
    names = set(dict(last.named_parameters()))
    assert "lm_head.weight" in names and "model.norm.weight" in names
    assert "model.embed_tokens.weight" not in names
    # Tied checkpoint: the last stage alone still gets its head from the embedding.
    make_tiny("llama-tied", tmp_path / "tied")
    head = load_model(str(tmp_path / "tied"), layers=(3, 4)).model
    whole = load_model(str(tmp_path / "tied")).model
    assert torch.equal(head.lm_head.weight, whole.model.embed_tokens.weight)

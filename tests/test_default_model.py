"""The real default model (SmolLM2-135M-Instruct, GGUF) against transformers, and
batch invariance of our engine."""

from __future__ import annotations

import pytest
import torch

from inference.config import EngineConfig, SamplingParams
from inference.engine import Engine
from inference.model_source import smollm2_path

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(kv_cache_gb=0.25, max_batch=8))


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # compare 64 tokens even past an end of turn
    return model.eval()


def test_greedy_matches_transformers_generate(engine, hf_model):
    prompts = [engine.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    ours = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    for ids, (tokens, _text, reason) in zip(prompts, ours):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, pad_token_id=0)[
                0, len(ids) :
            ].tolist()
        assert reason == "length"
        assert tokens == ref, f"first difference at {next(i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b)}"
    # The text is what the tokenizer makes of those tokens (special tokens skipped).
    assert "Paris" in ours[0][1]


def test_batch_invariance(engine):
    """A sequence decoded alone equals the same sequence decoded in a mixed batch of 4
    where the others have other lengths and are still in (chunked) prefill."""
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    target = engine.encode_chat([{"role": "user", "content": "Name three colours."}])
    alone = engine.generate([target], greedy)[0][0]

    # A second engine on the same weights with a small token budget, so long prompts
    # are prefilled in chunks while the target decodes.
    mixed = Engine(
        EngineConfig(kv_cache_gb=0.25, max_batch=8, max_batch_tokens=48),
        loaded=engine.loaded,
        tokenizer=engine.tokenizer,
    )
    others = [engine.encode(("The quick brown fox jumps over the lazy dog. " * n).strip()) for n in (3, 9, 14)]
    tid = mixed.add_request(target, greedy)
    got: list[int] = []
    added = 0
    saw_mixed_step = False
    while mixed.has_work:
        if added < len(others):  # a newcomer joins every step
            mixed.add_request(others[added], SamplingParams(temperature=0, max_tokens=20 + 5 * added, ignore_eos=True))
            added += 1
        running = mixed.scheduler.running
        decoding = [s for s in running if s.num_computed_tokens >= s.num_prompt_tokens]
        prefilling = [s for s in running if s.num_computed_tokens < s.num_prompt_tokens]
        saw_mixed_step |= bool(decoding and prefilling)
        for out in mixed.step():
            if out.seq_id == tid:
                got += out.token_ids
    assert saw_mixed_step
    assert got == alone
    assert mixed.kv.num_used_blocks == 0


def test_seeded_sampling_reproduces(engine):
    ids = engine.encode_chat([{"role": "user", "content": "Tell me a short joke."}])
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=20)
    a, b = engine.generate([ids, ids], params)
    c = engine.generate([ids], SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_tokens=20))[0]
    assert a[0] == b[0]
    assert a[0] != c[0]


def test_stop_string_ends_and_is_not_emitted(engine):
    ids = engine.encode_chat([{"role": "user", "content": "Count from 1 to 10, separated by commas."}])
    free = engine.generate([ids], SamplingParams(temperature=0, max_tokens=40))[0][1]
    assert "5" in free
    stop_at = free[free.index("5") :][:3]  # a stop string that starts at "5"
    tokens, text, reason = engine.generate([ids], SamplingParams(temperature=0, max_tokens=40, stop=[stop_at]))[0]
    assert reason == "stop"
    assert text == free[: free.index(stop_at)]

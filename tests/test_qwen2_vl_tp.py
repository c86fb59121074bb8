"""A tensor-parallel decoder stage of Qwen2-VL (a worker started with --tp 2): its rank 0
broadcasts the [3, T] M-RoPE positions to the other rank, and the split stage's output
equals the single-process stage's."""

from __future__ import annotations

import torch

from inference.config import LayerRange, SamplingParams
from inference.engine import load_tokenizer
from inference.kv_cache import KVCacheManager
from inference.loader import load_model
from inference.model_runner import ModelRunner
from inference.scheduler import ScheduledSeq
from inference.sequence import Sequence
from inference.tp_runner import start_tp
from inference.vision_prompt import ImagePrompter
from tests.tiny_vl import make_tiny_vl, picture

NUM_BLOCKS, BLOCK = 32, 4


def test_tp2_stage_takes_mrope_positions(tmp_path):
    make_tiny_vl(tmp_path)
    ends = load_model(str(tmp_path), layers=LayerRange(0, 0, 2, embed=True, head=True))
    master = ModelRunner(ends.model, ends.config, ends.layers, NUM_BLOCKS, BLOCK, torch.float32, "cpu")
    stage_range = LayerRange(0, 2, 2, embed=False, head=False)
    one = load_model(str(tmp_path), layers=stage_range)
    single = ModelRunner(one.model, one.config, one.layers, NUM_BLOCKS, BLOCK, torch.float32, "cpu")
    assert ends.config.vision is not None
    prompter = ImagePrompter(tmp_path, ends.config.vision)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and?"}]}]
    ids, images = prompter.encode(load_tokenizer(tmp_path), msgs, [picture(84, 56, 3)])
    seq = Sequence(ids, SamplingParams(temperature=0), images=images)
    kv = KVCacheManager(NUM_BLOCKS, BLOCK)
    tp = start_tp(str(tmp_path), "float32", "cpu", stage_range, NUM_BLOCKS, BLOCK, 2)
    try:
        for n in (len(ids), 1, 1):  # the prefill, then two decode steps (positions shifted by the delta)
            kv.allocate(seq, seq.num_computed_tokens + n)
            inputs = master.prepare([ScheduledSeq(seq, n)])
            assert inputs.positions.shape == (3, n)
            hidden = master.embed_inputs(inputs)
            want, got = single.forward(inputs, hidden), tp.forward(inputs, hidden)
            assert (want - got).abs().max().item() < 1e-4
            seq.num_computed_tokens += n
            seq.append_token(int(master.logits(inputs, want)[-1].argmax()))
    finally:
        tp.close()

"""The ring: master → stage 1 → stage 2 → master. The last stage's final hidden states land
on the master's result endpoint; stage 1 only acknowledges (no tensor comes back up); a
stage that dies mid-stream fails the step at once, not after the timeout."""
from __future__ import annotations

import time

import pytest
import torch

from cluster.pipeline import PipelineRunner
from cluster.ring import ResultServer, RingClient
from cluster.stage_client import StageClient, StageError
from cluster.tensor_wire import encode_step
from inference.config import EngineConfig, LayerRange, SamplingParams
from inference.engine import Engine
from inference.loader import load_model
from inference.model_runner import ModelRunner

from .test_pipeline import BLOCK, NUM_BLOCKS, start_stage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ring():
    results = ResultServer()
    port = results.start("127.0.0.1", 0)
    second, addr2 = start_stage(15, 30)
    first, addr1 = start_stage(0, 15, next_hop=addr2)
    yield dict(results=results, reply_to=f"127.0.0.1:{port}", addr1=addr1, first=first, second=second)
    for p in (first, second):
        p.kill()
        p.wait()
    results.stop()


def ring_engine(ring: dict, timeout: float = 30.0) -> tuple[Engine, RingClient]:
    ends = load_model("smollm2", layers=LayerRange(0, 0, 30, embed=True, head=True))
    local = ModelRunner(ends.model, ends.config, ends.layers, NUM_BLOCKS, BLOCK, torch.float32, "cpu")
    client = RingClient(ring["addr1"], ring["results"], ring["reply_to"], timeout=timeout)
    return Engine(EngineConfig(max_batch=8), loaded=ends, num_blocks=NUM_BLOCKS,
                  runner=PipelineRunner(local, client)), client


def test_ring_matches_single_process_and_answers_arrive_at_the_master(ring):
    single = Engine(EngineConfig(max_batch=8, kv_cache_gb=0.1))
    questions = ["What is 2+2?", "Name a colour.", "Say hi.", "Count to five."]
    prompts = [single.encode_chat([{"role": "user", "content": q}]) for q in questions]
    greedy = SamplingParams(temperature=0, max_tokens=16)
    expected = single.generate(prompts, greedy)
    engine, client = ring_engine(ring)
    before = ring["results"].results
    got = engine.generate(prompts, greedy)
    assert [g[0] for g in got] == [e[0] for e in expected]
    sent = client._sender.sent
    assert sent > 0 and ring["results"].results - before == sent  # every step came back on the ring


def test_stage_one_acknowledges_without_relaying_the_answer(ring):
    """Sent by hand: stage 1's answer is a bare ack; the hidden states reach the master."""
    step_id, fut = ring["results"].expect()
    req = encode_step(step_id, torch.randn(3, 576), torch.arange(3), torch.arange(3),
                      torch.zeros(1, 1, dtype=torch.long), [3], [3], 0, BLOCK)
    req.reply_to = ring["reply_to"]
    client = StageClient(ring["addr1"], timeout=30)
    try:
        ack = client.step(req)
    finally:
        client.close()
    assert not ack.HasField("hidden") and not ack.error
    result = fut.result(timeout=30)
    assert result.step_id == step_id and list(result.hidden.shape) == [3, 576]


def test_a_malformed_step_fails_at_once(ring):
    _, client = ring_engine(ring)
    req = encode_step(1, torch.randn(1, 576), torch.arange(1), torch.arange(1),
                      torch.zeros(1, 1, dtype=torch.long), [1], [1], 1, BLOCK * 2)  # wrong block size
    t = time.monotonic()
    with pytest.raises(StageError, match="block size"):
        client.step(req)
    assert time.monotonic() - t < 5
    client.close()


def test_a_dead_last_stage_fails_the_step_before_the_timeout(ring):
    engine, client = ring_engine(ring, timeout=30)
    engine.add_request(engine.encode("Hello"), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    engine.step()  # the ring works
    ring["second"].kill()
    ring["second"].wait()
    t = time.monotonic()
    with pytest.raises(StageError):
        for _ in range(16):
            engine.step()
    assert time.monotonic() - t < 5  # reported by stage 1 (its next hop broke), not timed out

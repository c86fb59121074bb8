"""Pipeline parallel on loopback, round the ring: master → stage 1 → stage 2 → master. Two
real stage processes give the same greedy tokens as the single-process engine; the last
stage's hidden states land on the master's result endpoint, stage 1 only acknowledges; a
stage that dies fails the step at once, reported by its upstream, not by a time-out."""

from __future__ import annotations

import pytest
import torch

from cluster.pipeline import PipelineRunner
from cluster.ring import ResultServer, RingClient
from cluster.stage_stream import GRPC_OPTIONS, StageError
from cluster.tensor_wire import encode_step
from inference.config import EngineConfig, LayerRange, SamplingParams
from inference.engine import Engine
from inference.loader import load_model
from inference.model_runner import ModelRunner
from proto import stage_pb2

from .conftest import QUESTIONS, stage_plan, start_stage

pytestmark = pytest.mark.slow
NUM_BLOCKS, BLOCK = 256, 16


@pytest.fixture(scope="module")
def ring():
    results = ResultServer()
    port = results.start("127.0.0.1", 0)
    second, addr2 = start_stage(15, 30, num_blocks=NUM_BLOCKS, block_size=BLOCK)
    first, addr1 = start_stage(0, 15, next_hop=addr2, num_blocks=NUM_BLOCKS, block_size=BLOCK)
    plan = stage_plan((0, 15), (15, 30))
    yield dict(results=results, reply_to=f"127.0.0.1:{port}", addr1=addr1, first=first, second=second, plan=plan)
    for p in (first, second):
        p.kill()
        p.wait()
    results.stop()


def ring_engine(ring: dict, timeout: float = 30.0) -> tuple[Engine, RingClient]:
    ends = load_model("smollm2", layers=LayerRange(0, 0, 30, embed=True, head=True))
    local = ModelRunner(ends.model, ends.config, ends.layers, NUM_BLOCKS, BLOCK, torch.float32, "cpu")
    client = RingClient(ring["addr1"], ring["results"], ring["reply_to"], ring["plan"], timeout=timeout)
    return Engine(
        EngineConfig(max_batch=8), loaded=ends, num_blocks=NUM_BLOCKS, runner=PipelineRunner(local, client)
    ), client


def first_hop(ring: dict, req: stage_pb2.StepRequest) -> stage_pb2.StepResponse:
    """Send one step to stage 1 by hand and return its direct answer (an ack or an error)."""
    import grpc

    from proto import stage_pb2_grpc

    with grpc.insecure_channel(ring["addr1"], options=GRPC_OPTIONS) as channel:
        steps = stage_pb2_grpc.StageStub(channel).Steps(iter([req]), timeout=30, metadata=ring["plan"].steps_metadata())
        return next(steps)


def test_two_stages_match_single_process_for_8_concurrent_requests(ring):
    single = Engine(EngineConfig(max_batch=8, kv_cache_gb=0.1))
    prompts = [single.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    expected = single.generate(prompts, greedy)
    engine, client = ring_engine(ring)
    before = ring["results"].results
    got = engine.generate(prompts, greedy)  # 8 at once: one continuous batch through both stages
    assert [g[0] for g in got] == [e[0] for e in expected]
    assert engine.kv.num_used_blocks == 0
    sent = client._sender.sent
    assert sent > 0 and ring["results"].results - before == sent  # every step came back on the ring
    engine.runner.close()


def test_a_quantized_split_equals_the_quantized_single_process(ring):
    """int4 stages (what `--quant auto` gives the default model) and an int4 master: the same
    tokens as one int4 process for the same batches."""
    greedy = SamplingParams(temperature=0, max_tokens=24)
    single = Engine(EngineConfig(max_batch=8, kv_cache_gb=0.1, quant="int4"))
    prompts = [single.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    expected = single.generate(prompts, greedy)
    stage = dict(num_blocks=NUM_BLOCKS, block_size=BLOCK, quant="int4")
    second, addr2 = start_stage(15, 30, **stage)
    first, addr1 = start_stage(0, 15, next_hop=addr2, **stage)
    try:
        ends = load_model("smollm2", layers=LayerRange(0, 0, 30, embed=True, head=True), quant="int4")
        local = ModelRunner(ends.model, ends.config, ends.layers, NUM_BLOCKS, BLOCK, torch.float32, "cpu")
        client = RingClient(addr1, ring["results"], ring["reply_to"], ring["plan"], timeout=30)
        engine = Engine(
            EngineConfig(max_batch=8), loaded=ends, num_blocks=NUM_BLOCKS, runner=PipelineRunner(local, client)
        )
        got = engine.generate(prompts, greedy)
        client.close()
    finally:
        for p in (first, second):
            p.kill()
            p.wait()
    assert [g[0] for g in got] == [e[0] for e in expected]


def test_stage_one_acknowledges_without_relaying_the_answer(ring):
    ring["results"].admit(ring["plan"])
    step_id, fut = ring["results"].expect(ring["plan"], 3, 576)
    req = encode_step(
        step_id,
        torch.randn(3, 576),
        torch.arange(3),
        torch.arange(3),
        torch.zeros(1, 1, dtype=torch.long),
        [3],
        [3],
        0,
        BLOCK,
    )
    req.reply_to = ring["reply_to"]
    ack = first_hop(ring, req)
    assert not ack.HasField("hidden") and not ack.error
    assert fut.result(timeout=30).shape == (3, 576)


def test_a_step_without_a_result_endpoint_is_refused(ring):
    """One transport: no step travels back up the chain, so a step must say where to answer."""
    req = encode_step(
        5,
        torch.randn(1, 576),
        torch.arange(1),
        torch.arange(1),
        torch.zeros(1, 1, dtype=torch.long),
        [1],
        [1],
        1,
        BLOCK,
    )
    ack = first_hop(ring, req)
    assert "reply_to" in ack.error and not ack.HasField("hidden")


def test_a_malformed_step_fails_without_waiting_for_the_timeout(ring):
    _, client = ring_engine(ring, timeout=120)
    req = encode_step(
        1,
        torch.randn(1, 576),
        torch.arange(1),
        torch.arange(1),
        torch.zeros(1, 1, dtype=torch.long),
        [1],
        [1],
        1,
        BLOCK * 2,
    )  # wrong block size
    with pytest.raises(StageError, match="block size"):  # a time-out would say "no result ... within"
        client.step(req)
    client.close()


def test_a_dead_last_stage_is_reported_by_its_upstream(ring):
    engine, client = ring_engine(ring, timeout=120)
    engine.add_request(engine.encode("Hello"), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    engine.step()  # the ring works
    ring["second"].kill()
    ring["second"].wait()
    # Stage 1 saw its next hop break, or the master saw the last stage's result stream drop;
    # a time-out would say "no result for step ... within".
    with pytest.raises(StageError, match="next stage|dropped its result stream"):
        for _ in range(16):
            engine.step()
    client.close()

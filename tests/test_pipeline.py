"""Pipeline parallel on loopback: the master (embedding, head, sampling) and two real
stage processes over gRPC give the same greedy tokens as the single-process engine."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.pipeline import PipelineRunner
from cluster.stage_client import StageClient, StageError
from inference.config import EngineConfig, LayerRange, SamplingParams
from inference.engine import Engine
from inference.loader import load_model
from inference.model_runner import ModelRunner

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
NUM_BLOCKS, BLOCK = 256, 16


def start_stage(start: int, end: int, next_hop: str | None = None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "cluster.stage_server", "--layers", str(start), str(end),
           "--num-blocks", str(NUM_BLOCKS), "--block-size", str(BLOCK), "--port", "0"]
    if next_hop:
        cmd += ["--next-hop", next_hop]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()  # blocks until the stage has loaded and bound its port
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"stage failed to start: {line!r}")
    return proc, line.rsplit(" ", 1)[1].strip()


@pytest.fixture(scope="module")
def stages():
    second, addr2 = start_stage(15, 30)
    first, addr1 = start_stage(0, 15, next_hop=addr2)
    yield addr1, first, second
    for p in (first, second):
        p.kill()
        p.wait()


def pipeline_engine(first_addr: str, timeout: float = 10.0) -> Engine:
    cfg = EngineConfig(max_batch=8)
    ends = load_model("smollm2", layers=LayerRange(0, 0, 30, embed=True, head=True))
    local = ModelRunner(ends.model, ends.config, ends.layers, NUM_BLOCKS, BLOCK, torch.float32, "cpu")
    runner = PipelineRunner(local, StageClient(first_addr, timeout=timeout))
    return Engine(cfg, loaded=ends, num_blocks=NUM_BLOCKS, runner=runner)


def test_two_stages_match_single_process_for_8_concurrent_requests(stages):
    single = Engine(EngineConfig(max_batch=8, kv_cache_gb=0.1))
    questions = ["What is 2+2?", "Name a colour.", "Say hi.", "What is the capital of Italy?",
                 "Name a dog breed.", "Count to five.", "What is water made of?", "Give me a fruit."]
    prompts = [single.encode_chat([{"role": "user", "content": q}]) for q in questions]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    expected = single.generate(prompts, greedy)
    piped = pipeline_engine(stages[0])
    got = piped.generate(prompts, greedy)  # 8 at once: one continuous batch through both stages
    assert [g[0] for g in got] == [e[0] for e in expected]
    assert piped.kv.num_used_blocks == 0


def test_a_dead_stage_is_a_stage_error_not_a_hang(stages):
    addr1, first, second = stages
    client = StageClient(addr1, timeout=5)
    assert client.health().end_layer == 15
    second.kill()
    second.wait()
    piped = pipeline_engine(addr1, timeout=5)
    piped.add_request(piped.encode("Hello"), SamplingParams(temperature=0, max_tokens=4))
    with pytest.raises(StageError):
        piped.step()

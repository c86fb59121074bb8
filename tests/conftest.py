"""Shared test helpers and fixtures.

Helpers are plain functions (import them: `from .conftest import free_port`); fixtures are
found by pytest. Waits poll state with a deadline instead of asserting on elapsed time:
a busy 2-core CI machine may be slow, but it must never be wrong."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Short chat prompts for the default model, shared by the tests that compare a split model with one process.
QUESTIONS = [
    "What is 2+2?",
    "Name a colour.",
    "Say hi.",
    "What is the capital of Italy?",
    "Name a dog breed.",
    "Count to five.",
    "What is water made of?",
    "Give me a fruit.",
]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], object], timeout: float = 10.0, what: str = "condition", interval: float = 0.02):
    """Poll `pred` until it returns something truthy (returned); AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


async def until(pred: Callable[[], object], timeout: float = 5.0, what: str = "condition"):
    """`wait_for` for async tests: yields to the event loop between polls."""
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)
    return value


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def expected() -> list[str]:
    """The default model's greedy chat replies to QUESTIONS (24 tokens) from the single-process
    engine: the reference a real cluster (test_cluster, test_tls) must equal. Float weights on
    both sides: requests reach the cluster one by one over HTTP, so its batches differ from
    this reference's, and only float logits leave no near-tie for that to flip (test_pipeline
    checks a quantized split with identical batches)."""
    from inference.config import EngineConfig, SamplingParams
    from inference.engine import Engine

    e = Engine(EngineConfig(kv_cache_gb=0.1, max_batch=8))
    prompts = [e.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    return [text for _, text, _ in e.generate(prompts, SamplingParams(temperature=0, max_tokens=24))]


# The data-plane secret hand-run stages and their test drivers share (see stage_plan).
STAGE_SECRET = "test-data-plane-secret-0123456789"


def stage_plan(*ranges: tuple[int, int], secret: str = STAGE_SECRET):
    """The credentials a driver of hand-run stages for these layer ranges uses (in ring order)."""
    from cluster.data_auth import PlanAuth

    return PlanAuth([f"stage-{a}-{b}" for a, b in ranges], secret.encode())


def start_stage(
    start: int,
    end: int,
    next_hop: str | None = None,
    model: str = "smollm2",
    tp: int = 1,
    num_blocks: int = 256,
    block_size: int = 16,
    quant: str = "none",
    secret: str = STAGE_SECRET,
) -> tuple[subprocess.Popen, str]:
    """A hand-run stage server (`python -m cluster.stage_server`) for layers [start, end),
    node id stage-START-END, with `secret` in its environment; returns the process and its
    gRPC address once it has loaded and bound its port."""
    cmd = [
        sys.executable,
        "-m",
        "cluster.stage_server",
        "--model",
        model,
        "--layers",
        str(start),
        str(end),
        "--num-blocks",
        str(num_blocks),
        "--block-size",
        str(block_size),
        "--port",
        "0",
        "--tp",
        str(tp),
        "--quant",
        quant,
    ]
    if next_hop:
        cmd += ["--next-hop", next_hop]
    env = dict(os.environ, RINGLLM_SECRET=secret)  # not on the command line, where `ps` shows it
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the stage has loaded and bound its port
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"stage failed to start: {line!r}")
    return proc, line.rsplit(" ", 1)[1].strip()

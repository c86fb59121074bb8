"""AsyncEngine: concurrent streams, queueing past max_batch, abort frees KV, not-ready."""

from __future__ import annotations

import asyncio

import pytest

from inference.async_engine import AsyncEngine, EngineNotReady
from inference.config import EngineConfig, SamplingParams
from inference.engine import Engine
from inference.errors import InvalidParameter

from .conftest import until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sync_engine() -> Engine:
    return Engine(EngineConfig(kv_cache_gb=0.1, max_batch=2))


async def collect(aeng: AsyncEngine, ids: list[int], params: SamplingParams) -> list[int]:
    toks: list[int] = []
    async for out in aeng.generate(ids, params):
        toks += out.token_ids
    return toks


async def wait_idle(aeng: AsyncEngine, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (s := aeng.stats()).running or s.waiting or s.kv_blocks_used:
        assert asyncio.get_running_loop().time() < deadline, f"engine still busy: {s}"
        await asyncio.sleep(0.02)


def test_streams_queue_past_max_batch_and_match_sequential(sync_engine):
    prompts = [
        sync_engine.encode_chat([{"role": "user", "content": q}])
        for q in ("Hi!", "Name a fruit.", "What is 3+4?", "Say hello in Spanish.", "Name a planet.")
    ]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = [t for t, _, _ in sync_engine.generate(prompts, greedy)]

    async def main():
        aeng = AsyncEngine(sync_engine, "smollm2")
        aeng.start()
        try:
            got = await asyncio.gather(*(collect(aeng, p, greedy) for p in prompts))
            await wait_idle(aeng)
            return got, aeng.stats()
        finally:
            await aeng.shutdown()

    got, stats = asyncio.run(main())
    assert got == alone  # 5 requests through a batch of 2: the rest queued, then joined
    assert stats.finished == 5 and stats.kv_blocks_used == 0


def test_leaving_the_stream_aborts_and_frees_blocks(sync_engine):
    ids = sync_engine.encode_chat([{"role": "user", "content": "Write a long essay about rivers."}])

    async def main():
        aeng = AsyncEngine(sync_engine, "smollm2")
        aeng.start()
        try:
            seen = 0
            async for _ in aeng.generate(ids, SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)):
                seen += 1
                if seen == 3:
                    break  # the consumer goes away, as a disconnected client does
            await wait_idle(aeng)
            return aeng.stats()
        finally:
            await aeng.shutdown()

    stats = asyncio.run(main())
    assert stats.aborted >= 1 and stats.running == 0 and stats.kv_blocks_used == 0


def test_errors_before_the_first_token(sync_engine):
    async def main():
        idle = AsyncEngine(None, "smollm2")
        assert not idle.stats().ready
        with pytest.raises(EngineNotReady):
            await collect(idle, [1, 2, 3], SamplingParams())
        aeng = AsyncEngine(sync_engine, "smollm2")
        aeng.start()
        try:
            with pytest.raises(InvalidParameter) as e:
                await collect(aeng, [1] * 10, SamplingParams(max_tokens=10**6))
            assert e.value.param == "max_tokens"
        finally:
            await aeng.shutdown()

    asyncio.run(main())


class FakeRunner:
    """Stands in for a pipeline: records its close (the AsyncEngine retires runners itself)."""

    def __init__(self, closed: list) -> None:
        self.closed = closed

    def close(self) -> None:
        self.closed.append(self)


def test_replaced_and_superseded_runners_are_closed_once(sync_engine):
    """A re-plan swaps runners at an idle moment; every runner the engine stops using, and one
    superseded before it was installed, is closed exactly once. The runner in use never is."""
    original = sync_engine.runner
    closed: list[object] = []
    a, b, c = FakeRunner(closed), FakeRunner(closed), FakeRunner(closed)

    async def main():
        aeng = AsyncEngine(sync_engine, "smollm2")
        aeng.swap_runner(a)
        aeng.swap_runner(b)  # the model thread is not running yet: a is never installed
        aeng.start()
        try:
            await until(lambda: sync_engine.runner is b, what="b installed")
            aeng.swap_runner(c)
            await until(lambda: sync_engine.runner is c, what="c installed")
            aeng.swap_runner(c)  # the runner in use: nothing to close
        finally:
            await aeng.shutdown()

    closes = []
    sync_engine.runner.close = lambda: closes.append("original")  # a ModelRunner's close is a no-op
    try:
        asyncio.run(main())
        assert closed == [a, b] and closes == ["original"]
    finally:
        del original.close
        sync_engine.runner = original


def test_availability_is_set_and_cleared_through_methods(sync_engine):
    """The cluster marks the engine unavailable (a broken pipeline, missing workers); the next
    installed runner clears it. Requests meanwhile get EngineNotReady with the reason."""
    original = sync_engine.runner

    async def main():
        aeng = AsyncEngine(sync_engine, "smollm2")
        aeng.start()
        try:
            await until(lambda: aeng.ready, what="ready")
            aeng.set_unavailable("waiting for workers: 0 of 2 connected")
            assert not aeng.ready and aeng.unavailable.startswith("waiting for workers")
            with pytest.raises(EngineNotReady, match="waiting for workers"):
                await collect(aeng, [1, 2, 3], SamplingParams(max_tokens=2))
            aeng.swap_runner(original)
            await until(lambda: aeng.ready, what="ready again after the swap")
            assert aeng.unavailable is None
            info = aeng.info()
            assert info is not None and (info.layer_start, info.layer_end, info.num_layers) == (0, 30, 30)
            assert info.quant == "none" and info.device == "cpu"
            assert aeng.max_model_len == info.max_model_len and aeng.encode("hi") == sync_engine.encode("hi")
        finally:
            await aeng.shutdown()

    asyncio.run(main())

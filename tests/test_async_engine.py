"""AsyncEngine: concurrent streams, queueing past max_batch, abort frees KV, not-ready,
admission limits, and queued requests that outlive a failed stage."""

from __future__ import annotations

import asyncio

import pytest

from inference.admission import AdmissionLimits, QueueFull, RequestTooLarge
from inference.async_engine import AsyncEngine, EngineNotReady, EngineUnavailable
from inference.config import EngineConfig, SamplingParams
from inference.engine import Engine
from inference.errors import InvalidParameter, StageFailure

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
    installed runner clears it. Requests meanwhile wait, up to the bound, then fail with the
    reason."""
    original = sync_engine.runner

    async def main():
        aeng = AsyncEngine(sync_engine, "smollm2", limits=AdmissionLimits(unavailable_wait_s=0.3))
        aeng.start()
        try:
            await until(lambda: aeng.ready, what="ready")
            aeng.set_unavailable("waiting for workers: 0 of 2 connected")
            assert not aeng.ready and aeng.accepting and aeng.unavailable.startswith("waiting for workers")
            with pytest.raises(EngineUnavailable, match="within 0 s: waiting for workers"):
                await asyncio.wait_for(collect(aeng, [1, 2, 3], SamplingParams(max_tokens=2)), 10)
            assert aeng.admission.in_flight == 0 and aeng.stats().waiting == 0
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


class BreakableRunner:
    """The real runner, until `broken` is set: then every forward fails as a dead stage does."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.broken = False

    def prepare(self, batch):
        return self.inner.prepare(batch)

    def forward(self, inputs, hidden=None):
        if self.broken:
            raise StageFailure("stage w2 reset the connection")
        return self.inner.forward(inputs, hidden)

    def logits(self, inputs, hidden):
        return self.inner.logits(inputs, hidden)

    def close(self) -> None:
        pass


def test_stage_failure_ends_running_requests_and_queued_ones_wait_for_the_replacement(sync_engine):
    """Two requests stream (max_batch=2), a third is queued, and the stage dies: the two end
    with StageFailure, the queued one and one that arrives during the outage produce nothing
    until a replacement runner is installed, then complete exactly as without the failure."""
    original = sync_engine.runner
    q1, q2 = (sync_engine.encode_chat([{"role": "user", "content": q}]) for q in ("Name a fruit.", "Say hi."))
    greedy = SamplingParams(temperature=0, max_tokens=6)
    expected = [t for t, _, _ in sync_engine.generate([q1, q2], greedy)]
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    broken = BreakableRunner(original)
    failures: list[StageFailure] = []

    async def main():
        aeng = AsyncEngine(sync_engine, "smollm2", on_stage_failure=failures.append)
        sync_engine.runner = broken
        aeng.start()
        try:
            running = [aeng.generate(q1, long), aeng.generate(q2, long)]
            for stream in running:
                await anext(stream)  # both hold a batch slot and have streamed a token
            queued = asyncio.ensure_future(collect(aeng, q1, greedy))
            await until(lambda: aeng.stats().waiting == 1, what="the third request to queue")
            broken.broken = True
            for stream in running:
                with pytest.raises(StageFailure, match="w2 reset"):
                    async for _ in stream:
                        pass
            assert aeng.unavailable is not None and "pipeline stage failed" in aeng.unavailable
            assert len(failures) == 1
            late = asyncio.ensure_future(collect(aeng, q2, greedy))  # arrives during the outage
            await until(lambda: aeng.stats().waiting == 2, what="both to wait")
            await asyncio.sleep(0.3)
            assert not queued.done() and not late.done()
            st = aeng.stats()
            assert (st.running, st.kv_blocks_used) == (0, 0)
            # The cached prefixes' KV died with the stage: none may be reused by the replacement.
            assert st.prefix_cache is not None and st.prefix_cache.cached_blocks == 0
            aeng.swap_runner(original)  # the cluster found a replacement stage
            got = await asyncio.wait_for(asyncio.gather(queued, late), 60)
            await wait_idle(aeng)
            return got, aeng.admission.in_flight
        finally:
            await aeng.shutdown()
            sync_engine.runner = original

    got, in_flight = asyncio.run(main())
    assert got == expected and in_flight == 0


def test_admission_limits_refuse_whole_requests(sync_engine):
    """max_batch=2 and max_queue=2: four choices may be in flight, a fifth is refused with a
    Retry-After guess; per-request limits refuse n and total tokens; a refusal queues nothing."""
    long = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
    limits = AdmissionLimits(max_queue=2, max_n=2, max_request_tokens=700)

    async def main():
        aeng = AsyncEngine(sync_engine, "smollm2", limits=limits)
        aeng.start()
        try:
            with pytest.raises(RequestTooLarge) as e:
                aeng.submit([([1, 2, 3], SamplingParams(max_tokens=4))] * 3)
            assert e.value.param == "n"
            with pytest.raises(RequestTooLarge) as e:
                aeng.submit([([1, 2, 3], SamplingParams(max_tokens=400))] * 2)  # 2 x 403 tokens > 700
            assert e.value.param == "max_tokens"
            streams = aeng.submit([([1, 2, 3], long)] * 2) + aeng.submit([([4, 5, 6], long)] * 2)
            assert aeng.admission.in_flight == 4
            with pytest.raises(QueueFull) as full:
                aeng.submit([([7, 8, 9], long)])
            assert 1 <= full.value.retry_after <= 60 and "busy" in str(full.value)
            assert aeng.admission.in_flight == 4
            for s in streams:
                s.close()
            assert aeng.admission.in_flight == 0
            await wait_idle(aeng)
            [stream] = aeng.submit([([7, 8, 9], SamplingParams(max_tokens=2))])  # room again
            outs = [o async for o in stream]
            assert outs[-1].finished and aeng.admission.in_flight == 0
        finally:
            await aeng.shutdown()

    asyncio.run(main())


def test_one_requests_choices_leave_slots_for_a_later_request(sync_engine):
    """max_batch=2: a request's two long choices hold one slot; a later short request
    finishes while both choices are still unfinished."""
    ids = sync_engine.encode_chat([{"role": "user", "content": "Say hi."}])

    async def main():
        aeng = AsyncEngine(sync_engine, "smollm2")
        aeng.start()
        try:
            big = aeng.submit([(ids, SamplingParams(temperature=0, max_tokens=300, ignore_eos=True))] * 2)
            first = await anext(big[0])
            assert not first.finished and aeng.stats().running == 1 and aeng.stats().waiting == 1
            short = await collect(aeng, ids, SamplingParams(temperature=0, max_tokens=3))
            assert len(short) == 3 and aeng.stats().waiting == 1  # the second choice still waits
            for s in big:
                s.close()
            await wait_idle(aeng)
        finally:
            await aeng.shutdown()

    asyncio.run(main())


def test_closing_a_stream_before_it_is_read_aborts_it(sync_engine):
    async def main():
        aeng = AsyncEngine(sync_engine, "smollm2")
        aeng.start()
        try:
            [stream] = aeng.submit([([1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True))])
            await stream.aclose()
            await wait_idle(aeng)
            assert aeng.admission.in_flight == 0 and [o async for o in stream] == []
        finally:
            await aeng.shutdown()

    asyncio.run(main())

"""Unit tests for the continuous-batching scheduler (pure Python, no torch).

A tiny fake engine loop drives it: every sequence whose step `needs_sample` gets token
TOKEN appended, and is finished once it has `max_tokens` outputs."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from inference.config import SamplingParams
from inference.errors import CacheFull
from inference.kv_cache import KVCacheManager
from inference.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from inference.sequence import Sequence, SequenceStatus

TOKEN = 7


def make_seq(prompt_len: int, max_tokens: int = 4, group: int | None = None) -> Sequence:
    return Sequence(list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), group=group)


def make(
    num_blocks: int = 64,
    block_size: int = 4,
    max_batch: int = 8,
    max_batch_tokens: int = 64,
    max_seqs_per_group: int | None = None,
):
    kv = KVCacheManager(num_blocks, block_size)
    return kv, Scheduler(kv, max_batch, max_batch_tokens, max_seqs_per_group)


def step(sched: Scheduler, done: list[Sequence] | None = None) -> SchedulerOutput:
    """One fake engine step; appends the sequences it finishes to `done`, in order."""
    out = sched.schedule()
    assert out.num_batched_tokens <= sched.max_batch_tokens
    sched.postprocess(out)
    for s in out.scheduled:
        if s.needs_sample:
            s.seq.append_token(TOKEN)
            if len(s.seq.output_token_ids) >= s.seq.params.max_tokens:
                sched.finish(s.seq, "length")
                if done is not None:
                    done.append(s.seq)
    if done is not None:
        done.extend(out.finished)
    check_invariants(sched)
    return out


def check_invariants(sched: Scheduler) -> None:
    kv = sched.kv
    assert sched.num_running <= sched.max_batch
    assert kv.num_used_blocks == sum(len(s.block_table) for s in sched.running)
    for s in sched.running:
        assert s.status is SequenceStatus.RUNNING
        assert len(s.block_table) * kv.block_size >= s.num_computed_tokens
    for s in sched.waiting:
        assert s.status is SequenceStatus.WAITING
        assert s.block_table == [] and s.num_computed_tokens == 0
    held = Counter(s.group for s in sched.running if s.group is not None)
    assert all(n <= sched.max_seqs_per_group for n in held.values()), held


def run_to_end(sched: Scheduler, max_steps: int = 10_000) -> list[Sequence]:
    done: list[Sequence] = []
    for _ in range(max_steps):
        if not sched.has_work:
            return done
        step(sched, done)
    raise AssertionError("scheduler did not drain")


def plan(out: SchedulerOutput) -> list[tuple[int, int]]:
    return [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled]


# -- admission ---------------------------------------------------------------------------
def test_admission_limited_by_free_blocks():
    kv, sched = make(num_blocks=5, block_size=4)
    a, b, c = make_seq(8), make_seq(8), make_seq(8)  # 2 blocks each
    for s in (a, b, c):
        sched.add(s)
    out = sched.schedule()
    assert plan(out) == [(a.seq_id, 8), (b.seq_id, 8)]
    assert sched.running == (a, b) and sched.waiting == (c,)
    assert kv.num_used_blocks == 4 and kv.num_free_blocks == 1
    assert all(s.needs_sample for s in out.scheduled)


def test_admission_limited_by_max_batch():
    kv, sched = make(max_batch=2)
    seqs = [make_seq(3) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    out = step(sched)
    assert [s.seq for s in out.scheduled] == seqs[:2]
    assert sched.num_running == 2 and sched.num_waiting == 1
    # The third one waits until a slot frees up, even though blocks are plentiful.
    out = step(sched)
    assert [s.seq for s in out.scheduled] == seqs[:2]
    assert sched.num_waiting == 1


def test_continuous_batching_new_request_joins_next_step():
    kv, sched = make()
    a = make_seq(5, max_tokens=10)
    sched.add(a)
    assert plan(step(sched)) == [(a.seq_id, 5)]
    assert plan(step(sched)) == [(a.seq_id, 1)]
    b = make_seq(6, max_tokens=3)
    sched.add(b)
    out = step(sched)
    assert plan(out) == [(a.seq_id, 1), (b.seq_id, 6)]  # decode and prefill in one batch
    assert out.num_batched_tokens == 7
    assert all(s.needs_sample for s in out.scheduled)
    assert plan(step(sched)) == [(a.seq_id, 1), (b.seq_id, 1)]
    done = run_to_end(sched)
    assert done == [b, a]
    assert len(a.output_token_ids) == 10 and len(b.output_token_ids) == 3
    assert kv.num_used_blocks == 0


# -- chunked prefill ---------------------------------------------------------------------
def test_chunked_prefill_alone():
    kv, sched = make(max_batch_tokens=8)
    a = make_seq(20, max_tokens=2)
    sched.add(a)
    outs = [step(sched) for _ in range(3)]
    assert [plan(o) for o in outs] == [[(a.seq_id, 8)], [(a.seq_id, 8)], [(a.seq_id, 4)]]
    assert [o.scheduled[0].start for o in outs] == [0, 8, 16]
    assert [o.scheduled[0].needs_sample for o in outs] == [False, False, True]
    assert a.output_token_ids == [TOKEN] and a.num_computed_tokens == 20
    assert len(a.block_table) == 5  # blocks cover exactly the 20 computed tokens
    out = sched.schedule()
    assert plan(out) == [(a.seq_id, 1)] and len(a.block_table) == 6  # the decode's token 21
    sched.postprocess(out)
    a.append_token(TOKEN)
    sched.finish(a, "length")
    assert not sched.has_work and kv.num_used_blocks == 0


def test_chunked_prefill_mixed_with_decodes():
    kv, sched = make(max_batch_tokens=8)
    a, b = make_seq(3, max_tokens=20), make_seq(2, max_tokens=20)
    sched.add(a)
    sched.add(b)
    assert plan(step(sched)) == [(a.seq_id, 3), (b.seq_id, 2)]
    c = make_seq(20, max_tokens=2)
    sched.add(c)
    outs = [step(sched) for _ in range(4)]
    assert [plan(o) for o in outs] == [
        [(a.seq_id, 1), (b.seq_id, 1), (c.seq_id, 6)],
        [(a.seq_id, 1), (b.seq_id, 1), (c.seq_id, 6)],
        [(a.seq_id, 1), (b.seq_id, 1), (c.seq_id, 6)],
        [(a.seq_id, 1), (b.seq_id, 1), (c.seq_id, 2)],
    ]
    assert [o.scheduled[2].needs_sample for o in outs] == [False, False, False, True]
    assert all(o.scheduled[0].needs_sample and o.scheduled[1].needs_sample for o in outs)
    assert len(c.output_token_ids) == 1
    run_to_end(sched)
    assert kv.num_used_blocks == 0


def test_running_prefill_chunk_comes_before_new_admissions():
    kv, sched = make(max_batch_tokens=8)
    a = make_seq(12, max_tokens=1)
    sched.add(a)
    assert plan(step(sched)) == [(a.seq_id, 8)]
    b = make_seq(6, max_tokens=1)
    sched.add(b)
    # a finishes its prefill first; b gets what is left of the budget.
    assert plan(step(sched)) == [(a.seq_id, 4), (b.seq_id, 4)]
    assert plan(step(sched)) == [(b.seq_id, 2)]


# -- preemption --------------------------------------------------------------------------
def test_preemption_and_resume():
    kv, sched = make(num_blocks=4, block_size=4, max_batch=2)
    a, b, c = make_seq(4, max_tokens=8), make_seq(4, max_tokens=8), make_seq(4, max_tokens=8)
    for s in (a, b, c):
        sched.add(s)
    for _ in range(5):  # prefill + 4 decodes: a and b hold 2 blocks each, 9 tokens each
        out = step(sched)
        assert [s.seq for s in out.scheduled] == [a, b] and not out.preempted
    assert kv.num_free_blocks == 0 and a.num_tokens == b.num_tokens == 9

    out = step(sched)  # a needs a third block: b, the most recent admission, is preempted
    assert out.preempted == [b]
    assert plan(out) == [(a.seq_id, 1)]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert len(b.output_token_ids) == 5  # it keeps its output
    assert sched.waiting == (b, c)  # at the front, ahead of c
    assert kv.num_used_blocks == 3

    done: list[Sequence] = []
    resumed = None
    while sched.has_work:
        out = step(sched, done)
        for s in out.scheduled:
            if s.seq is b and resumed is None:
                resumed = s
    # On resume b re-prefills prompt + output (9 tokens) in one chunk, then samples.
    assert resumed is not None and resumed.start == 0 and resumed.num_new_tokens == 9
    assert resumed.needs_sample
    assert done == [a, b, c]
    assert all(len(s.output_token_ids) == 8 for s in (a, b, c))
    assert kv.num_used_blocks == 0


def test_preempts_itself_when_it_is_the_latest():
    kv, sched = make(num_blocks=3, block_size=4, max_batch=2)
    a, b = make_seq(4, max_tokens=8), make_seq(8, max_tokens=8)
    sched.add(a)
    sched.add(b)
    step(sched)  # a: 1 block, b: 2 blocks -> pool full
    out = step(sched)  # a needs a second block: b (latest) goes; b would need a third
    assert out.preempted == [b] and plan(out) == [(a.seq_id, 1)]
    done = run_to_end(sched)
    assert done == [a, b] and kv.num_used_blocks == 0


def test_no_admission_in_a_step_that_preempted():
    # A budget of 2 tokens would let the victim come straight back with a 1-token chunk
    # into the block it just gave up: preempting and readmitting in one step is thrash.
    kv, sched = make(num_blocks=4, block_size=4, max_batch=2, max_batch_tokens=2)
    a, b = make_seq(4, max_tokens=12), make_seq(4, max_tokens=12)
    sched.add(a)
    sched.add(b)
    preempting_steps = 0
    while sched.has_work:
        waiting_before = set(sched.waiting)
        out = step(sched)
        if out.preempted:
            preempting_steps += 1
            scheduled = {s.seq for s in out.scheduled}
            assert scheduled.isdisjoint(out.preempted) and scheduled.isdisjoint(waiting_before)
    assert preempting_steps > 0
    assert len(a.output_token_ids) == len(b.output_token_ids) == 12
    assert kv.num_used_blocks == 0


def test_lone_sequence_that_outgrows_the_pool_is_finished():
    kv, sched = make(num_blocks=4, block_size=4)  # 16 tokens in all
    a = make_seq(12, max_tokens=100)
    sched.add(a)
    done = run_to_end(sched)
    assert done == [a] and a.finish_reason == "length"
    # 12 prompt + 4 computed outputs fill the pool; the 5th output is sampled but never run.
    assert len(a.output_token_ids) == 5
    assert kv.num_used_blocks == 0


def test_waiting_sequence_too_big_for_the_pool_does_not_block_the_queue():
    kv, sched = make(num_blocks=4, block_size=4)
    # A prompt that fits, carrying earlier output (e.g. resubmitted) past the pool's size.
    big = make_seq(10)
    big.output_token_ids.extend([TOKEN] * 10)
    small = make_seq(3)
    sched.add(big)
    sched.add(small)
    out = step(sched)
    assert out.finished == [big] and big.finish_reason == "length"
    assert plan(out) == [(small.seq_id, 3)]


def test_sequence_with_nothing_to_compute_is_not_scheduled():
    kv, sched = make()
    a, b = make_seq(3), make_seq(2)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    sched.postprocess(out)
    b.append_token(TOKEN)  # a's sampled token has not been appended yet
    assert plan(sched.schedule()) == [(b.seq_id, 1)]


# -- fairness ----------------------------------------------------------------------------
def test_fcfs_large_head_is_not_starved():
    kv, sched = make(num_blocks=8, block_size=4, max_batch=8)
    x = make_seq(16, max_tokens=3)  # 4 blocks, then 5 when decoding
    sched.add(x)
    step(sched)
    big = make_seq(24, max_tokens=2)  # 6 blocks: cannot fit while x runs
    small = [make_seq(2, max_tokens=2) for _ in range(3)]  # 1 block each: would fit
    sched.add(big)
    for s in small:
        sched.add(s)
    first_seen: dict[int, int] = {}
    done: list[Sequence] = []
    t = 0
    while sched.has_work:
        out = step(sched, done)
        for s in out.scheduled:
            first_seen.setdefault(s.seq.seq_id, t)
        if not x.is_finished:
            assert [s.seq for s in out.scheduled] == [x]  # nobody jumps over big
        t += 1
    assert first_seen[big.seq_id] <= min(first_seen[s.seq_id] for s in small)
    assert done[0] is x
    assert kv.num_used_blocks == 0


def test_equal_requests_complete_in_arrival_order():
    kv, sched = make(max_batch=2)
    seqs = [make_seq(5, max_tokens=4) for _ in range(7)]
    for s in seqs:
        sched.add(s)
    assert run_to_end(sched) == seqs


def test_one_request_holds_at_most_half_the_batch_by_default():
    kv, sched = make(max_batch=8)
    assert sched.max_seqs_per_group == 4
    big = [make_seq(4, max_tokens=1000, group=1) for _ in range(10)]  # n=10, ignore_eos style
    for s in big:
        sched.add(s)
    out = step(sched)
    assert [s.seq for s in out.scheduled] == big[:4]  # 4 of 8 slots, though all would fit
    assert sched.num_waiting == 6
    chat = make_seq(3, max_tokens=2, group=2)
    sched.add(chat)  # arrives later, behind six waiting siblings of the big request
    out = step(sched)
    assert chat in [s.seq for s in out.scheduled]  # starts at once, the big request still runs
    assert all(not s.is_finished for s in big[:4]) and sched.num_waiting == 6
    done = run_to_end(sched)
    assert done[0] is chat and {s.seq_id for s in done} == {s.seq_id for s in big + [chat]}
    assert kv.num_used_blocks == 0


def test_a_capped_request_takes_a_slot_when_one_of_its_own_finishes():
    kv, sched = make(max_batch=8, max_seqs_per_group=2)
    short, long_ = make_seq(2, max_tokens=1, group=1), make_seq(2, max_tokens=50, group=1)
    rest = [make_seq(2, max_tokens=50, group=1) for _ in range(3)]
    for s in (short, long_, *rest):
        sched.add(s)
    assert [s.seq for s in step(sched).scheduled] == [short, long_]
    assert short.is_finished  # one token: done after its prefill
    assert [s.seq for s in step(sched).scheduled] == [long_, rest[0]]  # its slot goes to a sibling
    assert sched.num_running == 2 and sched.num_waiting == 2


def test_requests_without_a_group_are_not_capped():
    kv, sched = make(max_batch=4, max_seqs_per_group=1)
    seqs = [make_seq(2) for _ in range(4)]
    for s in seqs:
        sched.add(s)
    assert [s.seq for s in step(sched).scheduled] == seqs


@pytest.mark.parametrize("cap", [0, -1])
def test_group_cap_validates(cap):
    with pytest.raises(ValueError):
        make(max_seqs_per_group=cap)


def test_long_prefill_leaves_half_the_step_to_a_waiting_request():
    kv, sched = make(max_batch_tokens=8)
    long_ = make_seq(40, max_tokens=1)
    sched.add(long_)
    assert plan(step(sched)) == [(long_.seq_id, 8)]  # alone: the whole budget
    chat = make_seq(3, max_tokens=2)
    sched.add(chat)
    # The chat starts in the next step instead of after the 32 tokens of prefill left.
    assert plan(step(sched)) == [(long_.seq_id, 4), (chat.seq_id, 3)]
    assert plan(step(sched)) == [(long_.seq_id, 7), (chat.seq_id, 1)]  # nobody waits: all of it
    run_to_end(sched)
    assert kv.num_used_blocks == 0


def test_decodes_keep_flowing_during_a_long_prefill():
    kv, sched = make(num_blocks=128, max_batch_tokens=16)
    streams = [make_seq(3, max_tokens=100) for _ in range(3)]
    for s in streams:
        sched.add(s)
    step(sched)
    long_ = make_seq(200, max_tokens=1)
    sched.add(long_)
    while not long_.is_finished:
        out = step(sched)
        # Every running stream gets its token in every step of the long prompt's prefill.
        assert [(s.seq, s.num_new_tokens) for s in out.scheduled[:3]] == [(s, 1) for s in streams]
        assert out.num_batched_tokens <= 16
    assert all(len(s.output_token_ids) >= 200 // 13 for s in streams)


def test_no_admission_while_the_engine_drains():
    kv, sched = make()
    a = make_seq(3, max_tokens=5)
    sched.add(a)
    step(sched)
    b = make_seq(3)
    sched.add(b)
    out = sched.schedule(admit=False)
    assert plan(out) == [(a.seq_id, 1)] and sched.waiting == (b,)


# -- abort and finish --------------------------------------------------------------------
def test_abort_frees_blocks_immediately():
    kv, sched = make(num_blocks=16, block_size=4, max_batch=2)
    a, b, c = make_seq(10), make_seq(5), make_seq(3)
    for s in (a, b, c):
        sched.add(s)
    step(sched)
    assert kv.num_used_blocks == 3 + 2  # a's 10 tokens + b's 5; c waits (max_batch)
    assert sched.abort(a.seq_id) is a
    assert kv.num_used_blocks == 2
    assert a.status is SequenceStatus.FINISHED and a.finish_reason == "abort"
    assert a.block_table == [] and a not in sched.running
    assert sched.abort(c.seq_id) is c and sched.waiting == ()
    assert c.finish_reason == "abort"
    assert sched.abort(a.seq_id) is None and sched.abort(10**9) is None
    sched.finish(a, "stop")  # late finish of an aborted sequence changes nothing
    assert a.finish_reason == "abort"
    sched.abort(b.seq_id)
    assert kv.num_used_blocks == 0 and not sched.has_work


def test_abort_during_forward_pass():
    kv, sched = make()
    a = make_seq(6)
    sched.add(a)
    out = sched.schedule()
    sched.abort(a.seq_id)
    sched.postprocess(out)  # must not resurrect computed tokens of a freed sequence
    assert a.num_computed_tokens == 0 and kv.num_used_blocks == 0


# -- bookkeeping -------------------------------------------------------------------------
def test_no_block_leak_under_random_load():
    rng = random.Random(1234)
    kv, sched = make(num_blocks=24, block_size=4, max_batch=6, max_batch_tokens=24)
    # A third of the sequences come in groups (the n choices of one request), capped at 3 slots.
    pending = [
        make_seq(rng.randint(1, 60), max_tokens=rng.randint(1, 24), group=rng.choice([None, None, 1, 2]))
        for _ in range(500)
    ]
    added: list[Sequence] = []
    done: list[Sequence] = []
    preemptions = 0
    for _ in range(100_000):
        if not pending and not sched.has_work:
            break
        for _ in range(rng.randint(0, 2)):
            if pending:
                sched.add(pending.pop())
                added.append(sched.waiting[-1])
        if rng.random() < 0.05 and (sched.running or sched.waiting):
            victim = rng.choice(sched.running + sched.waiting)
            assert sched.abort(victim.seq_id) is victim
        preemptions += len(step(sched, done).preempted)
    else:
        raise AssertionError("did not drain")
    assert len(added) == 500 and all(s.is_finished for s in added)
    assert kv.num_used_blocks == 0 and kv.num_free_blocks == 24
    assert preemptions > 0  # the load really exercised preemption
    for s in added:
        if s.finish_reason == "abort":
            continue
        assert s.finish_reason == "length"
        # Either it reached max_tokens, or the scheduler ended it when the pool was too small.
        assert len(s.output_token_ids) == s.params.max_tokens or s.num_tokens > kv.capacity_tokens
    assert len(done) + sum(s.finish_reason == "abort" for s in added) == 500


def test_prompt_that_can_never_fit_raises_cache_full():
    kv, sched = make(num_blocks=4, block_size=4)
    with pytest.raises(CacheFull):
        sched.add(make_seq(17))
    sched.add(make_seq(16))  # exactly the pool is fine
    assert sched.num_waiting == 1


def test_scheduled_seq_validates():
    s = make_seq(3)
    with pytest.raises(ValueError):
        ScheduledSeq(s, 0)
    with pytest.raises(ValueError):
        ScheduledSeq(s, 4)
    assert ScheduledSeq(s, 3).needs_sample and not ScheduledSeq(s, 2).needs_sample

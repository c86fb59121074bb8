"""The prefix tree alone, and under the real scheduler and block manager with a simulated KV
store that checks every context row a step reads holds the KV of exactly the tokens before it."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.config import SamplingParams
from inference.kv_cache import KVCacheManager
from inference.prefix_cache import PrefixTree
from inference.scheduler import Scheduler
from inference.sequence import Sequence, SequenceStatus

BS = 4


def hold(tree: PrefixTree, tokens: list[int], blocks: list[int]):
    """Cache `tokens` block by block under `blocks`, as a sequence that computed them does."""
    path = []
    for i in range(len(tokens) // BS):
        path.append(tree.extend(path[-1] if path else None, tree.key(tokens, i), blocks[i]))
    return path


# ---- the tree ------------------------------------------------------------------------------


def test_insert_match_and_the_last_partial_block():
    tree = PrefixTree(BS)
    path = hold(tree, list(range(10)), [7, 8])  # two full blocks; tokens 8, 9 are not cached
    assert tree.num_nodes == 2 and [n.refs for n in path] == [1, 1]
    assert tree.match(list(range(10)), 9).blocks == [7, 8]
    assert tree.match(list(range(10)), 1).blocks == [7]  # capped by the caller
    assert tree.match([0, 1, 2, 3, 4, 5, 6, 99], 9).blocks == [7]  # diverges inside block 2
    assert tree.match([1, 2, 3, 4], 9).blocks == []
    assert tree.match(list(range(10)), 9).unreferenced == 0
    tree.release(path)
    assert tree.num_evictable == 2 and tree.match(list(range(10)), 9).unreferenced == 2


def test_a_second_sequence_with_the_same_prefix_gets_the_cached_block():
    tree = PrefixTree(BS)
    a = hold(tree, [1, 2, 3, 4], [5])
    b = hold(tree, [1, 2, 3, 4], [6])  # computed it too, concurrently: block 5 wins, 6 is b's own
    assert b[0] is a[0] and a[0].block == 5 and a[0].refs == 2 and tree.num_nodes == 1


def test_divergence_splits_into_siblings():
    tree = PrefixTree(BS)
    hold(tree, [1, 2, 3, 4, 5, 6, 7, 8], [0, 1])
    hold(tree, [1, 2, 3, 4, 9, 9, 9, 9], [2, 3])
    assert tree.num_nodes == 3  # one shared first block, two second blocks
    assert tree.match([1, 2, 3, 4, 9, 9, 9, 9, 0], 2).blocks == [0, 3]
    assert tree.match([1, 2, 3, 4, 5, 6, 7, 8, 0], 2).blocks == [0, 1]


def test_eviction_takes_least_recently_used_leaves_and_never_held_blocks():
    tree = PrefixTree(BS)
    old = hold(tree, [1] * 8, [0, 1])
    new = hold(tree, [2] * 8, [2, 3])
    held = hold(tree, [3] * 8, [4, 5])
    tree.release(old)
    tree.release(new)
    assert tree.evict(1) == [1]  # old's leaf first; its parent is not a leaf until then
    assert tree.evict(2) == [0, 3]  # then old's root block (now a leaf), then new's leaf
    assert tree.evict(10) == [2]  # held blocks are never taken
    assert tree.num_nodes == 2 and [n.refs for n in held] == [1, 1]
    with pytest.raises(ValueError, match="still held"):
        tree.clear()
    tree.release(held)
    assert sorted(tree.clear()) == [4, 5] and tree.num_nodes == tree.num_evictable == 0


def test_release_more_than_acquired_is_refused():
    tree = PrefixTree(BS)
    path = hold(tree, [1] * 4, [0])
    tree.release(path)
    with pytest.raises(ValueError):
        tree.release(path)


blocks_of_tokens = st.lists(st.lists(st.integers(0, 2), min_size=BS, max_size=BS), max_size=5)


@settings(max_examples=200, deadline=None)
@given(st.lists(blocks_of_tokens, min_size=1, max_size=8), blocks_of_tokens)
def test_match_is_the_longest_common_block_prefix(inserted, query):
    tree = PrefixTree(BS)
    next_block = 0
    for blocks in inserted:
        tokens = [t for b in blocks for t in b]
        hold(tree, tokens, list(range(next_block, next_block + len(blocks))))
        next_block += len(blocks)
    q = [t for b in query for t in b]
    best = max(
        (next(i for i in range(len(b) + 1) if i == len(b) or i == len(query) or b[i] != query[i]) for b in inserted),
        default=0,
    )
    assert len(tree.match(q, len(query)).nodes) == best


# ---- the scheduler and block manager over a simulated KV store ------------------------------


class KVStore:
    """What each KV row holds: the tokens it was computed from (its token and all before it)."""

    def __init__(self, kv: KVCacheManager):
        self.kv = kv
        self.rows: dict[int, tuple[int, ...]] = {}

    def run(self, sched_out) -> None:
        for s in sched_out.scheduled:
            seq, toks = s.seq, tuple(s.seq.all_token_ids)
            for p in range(s.start):  # the context the attention reads
                assert self.rows.get(self.kv.slot(seq, p)) == toks[: p + 1], f"seq {seq.seq_id} row {p} corrupt"
            for p in range(s.start, s.start + s.num_new_tokens):
                self.rows[self.kv.slot(seq, p)] = toks[: p + 1]


def check_books(kv: KVCacheManager, live: list[Sequence]) -> None:
    """Every block is free, cached, or owned by one sequence; references match the tables."""
    tree = kv.tree
    assert tree is not None
    nodes = []
    stack = list(tree._root.children.values())
    while stack:
        n = stack.pop()
        nodes.append(n)
        stack.extend(n.children.values())
    refs = {id(n): 0 for n in nodes}
    owned: list[int] = []
    for s in live:
        path = kv._paths.get(s.seq_id, [])
        assert [n.block for n in path] == s.block_table[: len(path)]
        for n in path:
            refs[id(n)] += 1
        owned += s.block_table[len(path) :]
    assert all(n.refs == refs[id(n)] for n in nodes)
    cached = [n.block for n in nodes]
    everything = owned + cached + list(kv.pool._free)
    assert sorted(everything) == list(range(kv.pool.num_blocks)), "a block is lost or in two places"
    assert tree.num_evictable == sum(n.refs == 0 for n in nodes)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([6, 10, 24]))
def test_random_workload_never_reads_a_wrong_row_and_leaks_nothing(seed, num_blocks):
    rnd = random.Random(seed)
    kv = KVCacheManager(num_blocks, BS, prefix_cache=True)
    sched = Scheduler(kv, max_batch=4, max_batch_tokens=12)
    store = KVStore(kv)
    prefixes = [[rnd.randrange(3) for _ in range(rnd.randint(0, 12))] for _ in range(3)]
    limit = {}
    for _ in range(60):
        if rnd.random() < 0.4:
            prompt = rnd.choice(prefixes) + [rnd.randrange(3) for _ in range(rnd.randint(1, 6))]
            seq = Sequence(prompt, SamplingParams(), group=rnd.choice([None, 1]))
            if len(prompt) + 8 <= num_blocks * BS:
                sched.add(seq)
                limit[seq.seq_id] = rnd.randint(1, 8)
        if rnd.random() < 0.05 and sched.running:
            sched.abort(rnd.choice(sched.running).seq_id)
        out = sched.schedule()
        store.run(out)
        sched.postprocess(out)
        for s in out.scheduled:
            if s.needs_sample and s.seq.status is SequenceStatus.RUNNING:
                s.seq.append_token(rnd.randrange(3))
                if len(s.seq.output_token_ids) >= limit[s.seq.seq_id]:
                    sched.finish(s.seq, "length")
        check_books(kv, list(sched.running) + list(sched.waiting))
    for s in sched.running + sched.waiting:
        sched.abort(s.seq_id)
    assert kv.num_used_blocks == 0 and kv.tree is not None and kv.tree.num_evictable == kv.tree.num_nodes


def test_preempted_sequence_resumes_from_its_own_cached_blocks():
    kv = KVCacheManager(8, BS, prefix_cache=True)
    sched = Scheduler(kv, max_batch=2, max_batch_tokens=64)
    seq = Sequence(list(range(13)), SamplingParams())
    sched.add(seq)
    sched.postprocess(sched.schedule())  # 13 tokens computed: 3 full blocks cached
    sched._preempt_last()
    assert seq.status is SequenceStatus.WAITING and kv.tree is not None and kv.tree.num_nodes == 3
    out = sched.schedule()
    assert out.scheduled[0].start == 12 and out.scheduled[0].num_new_tokens == 1  # only the last token runs
    assert kv.stats.hit_tokens == 12


def test_requeue_after_a_lost_runner_empties_the_tree():
    kv = KVCacheManager(8, BS, prefix_cache=True)
    sched = Scheduler(kv, max_batch=2, max_batch_tokens=64)
    sched.add(Sequence(list(range(13)), SamplingParams()))
    sched.postprocess(sched.schedule())
    sched.requeue_running()
    assert kv.tree is not None and kv.tree.num_nodes == 0 and kv.num_free_blocks == 8
    out = sched.schedule()
    assert out.scheduled[0].start == 0  # its KV went with the runner: all of it runs again


def test_sequences_wait_for_a_prompt_being_computed_and_then_share_it():
    kv = KVCacheManager(16, BS, prefix_cache=True)
    sched = Scheduler(kv, max_batch=8, max_batch_tokens=64)
    prompt = list(range(10))
    seqs = [Sequence(prompt, SamplingParams(), group=7) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    first = sched.schedule()
    assert [s.seq for s in first.scheduled] == [seqs[0]]  # the others wait for its blocks
    sched.postprocess(first)
    seqs[0].append_token(1)
    second = sched.schedule()
    assert {s.seq.seq_id: s.start for s in second.scheduled} == {
        seqs[0].seq_id: 10,
        seqs[1].seq_id: 8,
        seqs[2].seq_id: 8,
    }
    assert seqs[1].block_table[:2] == seqs[2].block_table[:2] == seqs[0].block_table[:2]
    assert seqs[1].num_cached_tokens == 8


def test_without_prefix_cache_nothing_is_shared():
    kv = KVCacheManager(16, BS)
    sched = Scheduler(kv, max_batch=8, max_batch_tokens=64)
    a, b = Sequence(list(range(10)), SamplingParams()), Sequence(list(range(10)), SamplingParams())
    sched.add(a)
    sched.postprocess(sched.schedule())
    a.append_token(1)
    sched.add(b)
    out = sched.schedule()
    assert out.scheduled[1].start == 0 and not set(a.block_table) & set(b.block_table)


def test_users_behind_one_system_prompt_compute_it_once():
    kv = KVCacheManager(32, BS, prefix_cache=True)
    sched = Scheduler(kv, max_batch=8, max_batch_tokens=8)  # the 12-token system prompt takes chunks
    system = list(range(12))
    users = [Sequence(system + [50 + i, 60 + i], SamplingParams()) for i in range(3)]
    for s in users:
        sched.add(s)
    computed = 0
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in users):
        out = sched.schedule()
        computed += out.num_batched_tokens
        sched.postprocess(out)
    # The first computes all 14 tokens; the others wait for the system prompt, then find all 12.
    assert computed == 14 + 2 + 2
    assert [s.num_cached_tokens for s in users] == [0, 12, 12]

"""The prefix cache changes no output: 50 random multi-turn conversations (three shared
system prompts) give the same greedy tokens with and without it, in one process, through two
pipeline stages over gRPC and under tensor parallelism; also under a pool so small that
blocks are evicted and sequences preempted, with seeded sampling and stop strings, and with
`n` choices sharing one prompt."""

from __future__ import annotations

import random

import pytest

from inference.config import EngineConfig, SamplingParams
from inference.engine import Engine
from inference.tp_runner import tp_engine

from .tiny_models import IdTokenizer, make_tiny
from .tiny_ring import BLOCK, MAX_SEQS, MAX_TOKENS, NUM_BLOCKS, tiny_ring

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def converse(engine: Engine, n: int = 50, turns: int = 3, seed: int = 0) -> list[list[list[int]]]:
    """Each turn re-sends the whole history (system prompt, earlier turns and replies) plus
    a new user message, as chat clients do; returns every turn's replies."""
    rnd = random.Random(seed)

    def user() -> list[int]:
        return [rnd.randrange(256) for _ in range(rnd.randint(3, 20))]

    systems = [[rnd.randrange(256) for _ in range(rnd.randint(16, 40))] for _ in range(3)]
    history = [rnd.choice(systems) + user() for _ in range(n)]
    replies = []
    for _ in range(turns):
        got = [g[0] for g in engine.generate(history, GREEDY)]
        replies.append(got)
        history = [h + r + user() for h, r in zip(history, got)]
    return replies


def idle(engine: Engine) -> None:
    """Nothing held: every cached block is back to zero references."""
    tree = engine.kv.tree
    assert tree is not None
    assert engine.kv.num_used_blocks == 0 and tree.num_evictable == tree.num_nodes


def tiny_engine(path, prefix_cache: bool, num_blocks: int = NUM_BLOCKS, **kw) -> Engine:
    cfg = EngineConfig(
        model=str(path),
        block_size=BLOCK,
        max_batch=MAX_SEQS,
        max_batch_tokens=MAX_TOKENS,
        prefix_cache=prefix_cache,
        **kw,
    )
    return Engine(cfg, tokenizer=IdTokenizer(), num_blocks=num_blocks)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny("llama-untied", path)
    return path


@pytest.fixture(scope="module")
def reference(model):
    return converse(tiny_engine(model, prefix_cache=False))


def test_one_process_with_and_without_the_cache(model, reference):
    engine = tiny_engine(model, prefix_cache=True)
    assert converse(engine) == reference
    idle(engine)
    stats = engine.kv.stats
    # The system prompts are shared from turn 1 on; the 50 histories (~2,700 tokens a turn)
    # overflow the 1,024-token pool, so the histories of the last conversations are found again.
    assert stats.hit_tokens > 0.3 * stats.lookup_tokens, stats
    assert stats.evicted_blocks > 0


def test_a_tiny_pool_evicts_and_preempts_without_changing_anything(model, reference):
    engine = tiny_engine(model, prefix_cache=True, num_blocks=16)
    assert converse(engine) == reference
    idle(engine)
    assert engine.kv.stats.evicted_blocks > 0


def test_two_pipeline_stages(model, reference, tmp_path):
    with tiny_ring(str(tmp_path), max_context_tokens=None) as ring:
        assert converse(ring.engine) == reference
        idle(ring.engine)
        assert ring.engine.kv.stats.hit_tokens > 0


@pytest.mark.slow
def test_tensor_parallel(model, reference):
    cfg = EngineConfig(
        model=str(model), block_size=BLOCK, max_batch=MAX_SEQS, max_batch_tokens=MAX_TOKENS, kv_cache_gb=0.001, tp=2
    )
    engine = tp_engine(cfg, tokenizer=IdTokenizer())
    try:
        assert converse(engine) == reference
        idle(engine)
        assert engine.kv.stats.hit_tokens > 0
    finally:
        engine.runner.close()


def run(engine: Engine, prompts, params: SamplingParams, n: int = 1, scores: bool = False):
    """Every prompt `n` times as one request's choices; (tokens, text) per sequence, and its
    logprobs with `scores`."""
    ids = [engine.add_request(p, params, group=g) for g, p in enumerate(prompts) for _ in range(n)]
    got: dict[int, tuple[list[int], list[str], list]] = {i: ([], [], []) for i in ids}
    while engine.has_work:
        for o in engine.step():
            got[o.seq_id][0].extend(o.token_ids)
            got[o.seq_id][1].append(o.text)
            got[o.seq_id][2].extend(o.logprobs)
    return [(got[i][0], "".join(got[i][1])) + ((got[i][2],) if scores else ()) for i in ids]


def test_sampling_stop_strings_logprobs_and_n_choices(model):
    rnd = random.Random(1)
    system = [rnd.randrange(256) for _ in range(40)]
    prompts = [system + [rnd.randrange(256) for _ in range(5)] for _ in range(4)]
    sampled = SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=10, ignore_eos=True, stop=[" 7"])
    plain, cached = tiny_engine(model, prefix_cache=False), tiny_engine(model, prefix_cache=True)
    assert run(cached, prompts, sampled) == run(plain, prompts, sampled)
    with_logprobs = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2)
    a, b = run(plain, prompts, with_logprobs, scores=True), run(cached, prompts, with_logprobs, scores=True)
    assert [x[0] for x in a] == [x[0] for x in b]
    for (_, _, la), (_, _, lb) in zip(a, b):
        assert all(abs(p.logprob - q.logprob) < 1e-4 for p, q in zip(la, lb))
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    cached.kv.stats.hit_tokens = 0
    fresh = [[rnd.randrange(256) for _ in range(45)]]
    choices = run(cached, fresh, greedy, n=4)
    assert choices == run(plain, fresh, greedy) * 4
    # The first choice computed the 45-token prompt; the other three started from its 2 full blocks.
    assert cached.kv.stats.hit_tokens == 3 * 32
    idle(cached)


def test_prompt_logprobs_compute_the_whole_prompt(model):
    engine = tiny_engine(model, prefix_cache=True)
    prompt = list(range(40))
    run(engine, [prompt], GREEDY)
    scored = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    seq_id = engine.add_request(prompt, scored)
    outs = []
    while engine.has_work:
        outs += [o for o in engine.step() if o.seq_id == seq_id]
    assert outs[0].prompt_logprobs is not None and len(outs[0].prompt_logprobs) == 39
    assert outs[0].num_cached_tokens == 0

"""Prompt scoring (`SamplingParams.prompt_logprobs`): the engine's logprob of each prompt token
given the ones before it equals transformers' on a tiny random model, over chunked prefills
that share their steps with other sequences."""

from __future__ import annotations

import pytest
import torch

from inference.config import EngineConfig, SamplingParams
from inference.engine import Engine, RequestOutput
from inference.errors import InvalidParameter
from inference.sampler import score_tokens
from tests.tiny_models import IdTokenizer, make_tiny

TOL = 1e-4
TOP = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf = make_tiny("llama-untied", path)
    # A small token budget: the long prompt is prefilled in several chunks, next to the others.
    engine = Engine(EngineConfig(model=str(path), max_batch_tokens=8, kv_cache_gb=0.01), tokenizer=IdTokenizer())
    return hf, engine


def _run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> dict[int, list[RequestOutput]]:
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    outs: dict[int, list[RequestOutput]] = {i: [] for i in ids}
    while engine.has_work:
        for o in engine.step():
            outs[o.seq_id].append(o)
    return {k: outs[i] for k, i in enumerate(ids)}


def test_prompt_logprobs_match_transformers_over_chunked_prefill(tiny):
    hf, engine = tiny
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (21, 5, 1, 9)]
    scored = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=TOP)
    plain = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    outs = _run(engine, prompts, [scored, scored, scored, plain])
    alone = _run(engine, [prompts[3]], [plain])[0]
    for k, prompt in enumerate(prompts[:3]):
        first, rest = outs[k][0], outs[k][1:]
        assert all(o.prompt_logprobs is None for o in rest)  # only the first output carries them
        got = first.prompt_logprobs
        assert got is not None and [s.token_id for s in got] == prompt[1:]
        if len(prompt) == 1:
            continue
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0, :-1].log_softmax(-1)
        want = ref.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
        assert torch.allclose(torch.tensor([s.logprob for s in got]), want, atol=TOL)
        top_v, top_i = ref.topk(TOP, dim=-1)
        for s, ids, vals in zip(got, top_i.tolist(), top_v.tolist()):
            assert s.top_logprobs is not None and [a.token_id for a in s.top_logprobs] == ids
            assert [a.logprob for a in s.top_logprobs] == pytest.approx(vals, abs=TOL)
    # A request that did not ask is not scored, and scoring others changes nothing for it.
    assert all(o.prompt_logprobs is None for o in outs[3])
    assert [o.token_ids for o in outs[3]] == [o.token_ids for o in alone]


def test_score_tokens_reports_the_target_and_its_best_alternatives():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    out = score_tokens(logits, [1, 2], 2)
    assert [o.token_id for o in out] == [1, 2]
    assert [o.logprob for o in out] == pytest.approx([torch.log(torch.tensor(0.3)).item(), -0.2231435], abs=1e-6)
    assert [[a.token_id for a in o.top_logprobs or []] for o in out] == [[0, 1], [2, 0]]
    assert all(o.top_logprobs == [] for o in score_tokens(logits, [0, 0], 0))


def test_prompt_logprobs_is_validated():
    for bad in (-1, 21, True, 1.5):
        with pytest.raises(InvalidParameter, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)


def test_a_recomputed_prefill_scores_only_what_is_new(tiny, monkeypatch):
    """A preempted sequence runs its prompt again: rows it already scored are skipped."""
    from inference.runner import PromptSpan, StepInputs

    _, engine = tiny
    inputs = StepInputs([], torch.empty(0), torch.empty(0), None, [], [])  # no metadata: logits are stubbed
    prompt = list(range(10, 22))
    seq_id = engine.add_request(prompt, SamplingParams(max_tokens=1, prompt_logprobs=0))
    req = engine._requests[seq_id]
    asked: list[list[int]] = []

    def logits(inputs, hidden):
        asked.append(list(inputs.sample_rows))
        return torch.zeros(len(inputs.sample_rows), 256)

    monkeypatch.setattr(engine.runner, "logits", logits)
    try:
        engine._score_prompt(inputs, torch.empty(0), PromptSpan(0, 0, 0, 6), req)  # a first run: tokens 1..6
        engine._score_prompt(inputs, torch.empty(0), PromptSpan(0, 0, 0, 8), req)  # the rerun reaches token 8
        assert asked == [[0, 1, 2, 3, 4, 5], [6, 7]]
        assert [s.token_id for s in req.prompt_scores] == prompt[1:9]
    finally:
        engine.abort(seq_id)
